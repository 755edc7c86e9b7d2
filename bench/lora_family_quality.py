"""The quality half of bench/lora_family.py: compressed members against PEFT's own outputs.

For each real LoRA, PEFT (``PeftModel`` with every real LoRA loaded, the one measured active)
generates ``tokens`` greedy tokens on each held prompt, once; those tokens and PEFT's next-token
distributions are the reference at every R. A compressed member is read back from the family
folder by the server's own reader (``read_adapter`` with the family's factors), its delta
B_f N A_f merged into the base weights (float64 add) with PEFT's adapters off, and run
teacher-forced on PEFT's tokens (nlora_serve.adapters.compress.report.compare_outputs).

Why teacher-forced: free-running greedy decoding diverges for good after one flipped near-tie,
and every later position then compares different contexts, so one flip can cost most of the
agreement; teacher-forced, each position is judged on the same context and a flip costs one
position of ``held × tokens``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

HELD = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence.",
    "List three uses of copper.",
    "SELECT name FROM employees WHERE",
    "Tell me about the history of the bicycle.",
    "Translate 'good morning' into Spanish.",
)


class QualityCheck:
    """PEFT references for ``real_dirs`` on ``held`` prompts × ``tokens`` tokens (computed once)."""

    def __init__(self, real_dirs: list[Path], held: int, tokens: int):
        from peft import PeftModel
        from transformers import AutoTokenizer

        from nlora_serve.adapters.compress.report import reference_outputs
        from nlora_serve.models import load_base, load_hf_model

        if not 1 <= held <= len(HELD):
            raise ValueError(f"held prompts must be 1..{len(HELD)}; got {held}")
        start = time.perf_counter()
        self.base = load_base("default", torch.float32)
        tok = AutoTokenizer.from_pretrained(self.base.path)
        self.prompts = [tok(t)["input_ids"] for t in HELD[:held]]
        self.names = [d.name for d in real_dirs]
        model = PeftModel.from_pretrained(load_hf_model(self.base.path, torch.float32), str(real_dirs[0]),
                                          adapter_name=real_dirs[0].name)
        for d in real_dirs[1:]:
            model.load_adapter(str(d), adapter_name=d.name)
        model.eval()
        self.refs = {}
        for name in self.names:
            model.set_adapter(name)
            self.refs[name] = reference_outputs(model, self.prompts, tokens)
        self.model = model
        self.seconds = time.perf_counter() - start

    def measure(self, family: Path) -> dict[str, dict]:
        """Per real member of the family folder: agreement, mean KL (nats), positions, gate verdict."""
        from nlora_serve.adapters.compress import report as cr
        from nlora_serve.adapters.compress.build import low_rank
        from nlora_serve.adapters.family import FamilyResolver
        from nlora_serve.adapters.loader import read_adapter

        start = time.perf_counter()
        families = FamilyResolver(self.base.spec, (family,))
        out = {}
        for name in self.names:
            member = read_adapter(family / name, self.base, max_rank=1 << 16, families=families)  # any family rank
            deltas = {}
            for site in member.sites:
                f = low_rank(member, site)
                deltas[site] = f.scaling * f.B @ f.A
            with self.model.disable_adapter(), cr.merged(self.model, deltas):
                agree, kl, count = cr.compare_outputs(self.model, self.prompts, self.refs[name])
            out[name] = {"agreement": agree, "kl": kl, "positions": count,
                         "passes": agree >= cr.GATE_AGREEMENT and kl <= cr.GATE_KL}
        self.seconds += time.perf_counter() - start
        return out
