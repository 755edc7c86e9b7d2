"""Independent references for the adapter tests: merging straight from the files, greedy decoding.

Nothing here imports ``nlora_serve.adapters``: the merge reads the safetensors and the config with
its own few lines (s = alpha/r, or alpha/sqrt(r) with use_rslora), so tests compare our reader
against a second implementation, not against itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CASES = Path(__file__).resolve().parents[1] / "data" / "cases"
KEY = re.compile(r"base_model\.model\.(model\.layers\.\d+\.\w+\.\w+)\.lora_(A|N|B)\.(weight|bias)")


def load_case(name: str) -> dict:
    """``case.json`` of one case under tests/data/cases."""
    return json.loads((CASES / name / "case.json").read_text())


def case_names() -> list[str]:
    """Every case directory name, sorted."""
    return sorted(p.name for p in CASES.iterdir() if (p / "case.json").is_file())


def greedy_matches(got: list[int], ref: dict) -> bool:
    """Cases README rule: tokens equal up to the first step whose top-2 margin is below 1e-3."""
    for step, (g, r) in enumerate(zip(got, ref["greedy_token_ids"])):
        if g != r:
            return min(ref["top2_logit_margins"][: step + 1]) < 1e-3
    return len(got) >= len(ref["greedy_token_ids"])


def file_deltas(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({module: s·B@N@A [out, in]}, {module: s·b [out]})`` in float64, read straight from the
    files. Only for configs without rank/alpha patterns (asserted)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        m = KEY.fullmatch(key)
        assert m, key
        parts.setdefault(m.group(1), {})[m.group(2) + m.group(3)] = t.to(torch.float64)
    deltas, biases = {}, {}
    for module, p in parts.items():
        n = p.get("Nweight", torch.eye(r, dtype=torch.float64))
        deltas[module] = s * (p["Bweight"] @ n @ p["Aweight"])
        if "Bbias" in p:
            biases[module] = s * p["Bbias"]
    return deltas, biases


@contextlib.contextmanager
def merged(model: torch.nn.Module, deltas: dict, biases: dict | None = None):
    """Temporarily set W' = W + delta (and bias' = bias + s·b) on ``model``'s modules; restores them."""
    modules = dict(model.named_modules())
    saved = {}
    try:
        for name, d in deltas.items():
            lin = modules[name]
            saved[name] = (lin.weight.data.clone(), lin.bias)
            lin.weight.data = (lin.weight.data.to(torch.float64) + d).to(lin.weight.dtype)
        for name, b in (biases or {}).items():
            lin = modules[name]
            old = lin.bias.data.to(torch.float64) if lin.bias is not None else 0.0
            lin.bias = torch.nn.Parameter((old + b).to(lin.weight.dtype), requires_grad=False)
        yield model
    finally:
        for name, (w, bias) in saved.items():
            modules[name].weight.data = w
            modules[name].bias = bias


@torch.no_grad()
def greedy(model, prompt_ids: list[int], steps: int = 24) -> list[int]:
    """``steps`` greedy tokens, EOS ignored (as the case references were made)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def forced_greedy(model, ref: dict) -> list[int]:
    """The greedy tokens of ``model`` checked in one forward pass: feed the prompt plus the
    reference tokens and take the argmax at each of the 24 steps. Up to the first token that
    differs from the reference the context equals true greedy decoding's, so
    ``greedy_matches(forced_greedy(m, ref), ref)`` is the README rule at 1/24th of the cost."""
    prompt, tokens = ref["prompt_token_ids"], ref["greedy_token_ids"]
    logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    eos = model.generation_config.eos_token_id
    logits[:, [eos] if isinstance(eos, int) else list(eos or [])] = -float("inf")  # as min_new_tokens does
    return logits.argmax(-1).tolist()


def first_near_tie(ref: dict) -> int:
    """Index of the first step whose top-2 margin is below 1e-3 (len if none)."""
    return next((i for i, m in enumerate(ref["top2_logit_margins"]) if m < 1e-3), len(ref["top2_logit_margins"]))


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want| (cheap, for large float64 matrices)."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def write_raw_adapter(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A hand-made adapter directory (not via our writer)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


def lora_config(**overrides) -> dict:
    """A PEFT LoRA config as PEFT writes it (r=4, alpha=8, q_proj and v_proj)."""
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
           "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
           "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
           "init_lora_weights": True, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    cfg.update(overrides)
    return cfg
