"""The quality report of ``adapters compress``: how far each compressed member is from its LoRA.

Two measures per adapter:

- weights: relative reconstruction error ‖Δ − B_f N A_f‖_F / ‖Δ‖_F per site (from the factors,
  ``basis.ModuleFit.rel_error``), summarised per module (mean and max over layers);
- outputs, on held prompts: the uncompressed adapter generates greedily with PEFT itself (plain
  LoRA folders are loaded by ``peft.PeftModel``; an NLoRA folder, which PEFT cannot read, runs as
  its exact merged delta and the report says so); the compressed member is run on the same base
  with its family delta B_f N A_f merged into the weights (float64 merge), teacher-forced on the
  reference tokens. Greedy token agreement = fraction of positions whose argmax equals PEFT's
  argmax at the same position (its greedy choice; the generated token differs where that is EOS,
  which generation suppresses to reach the asked length); KL = mean over positions of
  KL(p_PEFT ‖ p_compressed) of the next-token distributions (nats).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nlora_serve.models.spec import ModelSpec

HELD_PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain why the sky is blue in one sentence.",
)
GATE_AGREEMENT = 0.95  # greedy token agreement at least this ...
GATE_KL = 0.05  # ... and mean next-token KL at most this (nats) to pass the quality gate


@dataclass(slots=True)
class AdapterQuality:
    """One adapter's row of the report."""

    name: str
    rel_error: dict[str, dict[str, float]]  # module -> {"mean": .., "max": ..} over layers
    rel_error_mean: float  # mean over every site
    agreement: float | None = None  # greedy token agreement against the reference, [0, 1]
    kl: float | None = None  # mean next-token KL(reference ‖ compressed), nats
    reference: str = ""  # "peft" or "merged" (what produced the uncompressed outputs)
    tokens: int = 0  # positions compared
    site_errors: dict[str, float] = field(default_factory=dict)  # "layer.module" -> error

    @property
    def passes(self) -> bool:
        """The quality gate: agreement ≥ 95% and KL ≤ 0.05 (False when outputs were not measured)."""
        return self.agreement is not None and self.agreement >= GATE_AGREEMENT and self.kl <= GATE_KL


def weight_errors(name: str, errors: dict[tuple[int, str], float]) -> AdapterQuality:
    """The weights half of a row, from per-site relative errors."""
    by_module: dict[str, list[float]] = {}
    for (_, module), e in errors.items():
        by_module.setdefault(module, []).append(e)
    summary = {m: {"mean": sum(v) / len(v), "max": max(v)} for m, v in by_module.items()}
    return AdapterQuality(name, summary, sum(errors.values()) / len(errors),
                          site_errors={f"{layer}.{m}": e for (layer, m), e in sorted(errors.items())})


def _linear(model, layer: int, module: str) -> torch.nn.Linear:
    """The base nn.Linear of one projection (inside a PEFT wrapper when there is one)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the HF model
    mod = inner.get_submodule(ModelSpec.module_path(layer, module))
    return getattr(mod, "base_layer", mod)


@contextlib.contextmanager
def merged(model, deltas: dict[tuple[int, str], torch.Tensor]):
    """Temporarily W ← W + Δ (float64 add, cast back) on the base linears of ``model``."""
    saved = {}
    try:
        for site, d in deltas.items():
            lin = _linear(model, *site)
            saved[site] = lin.weight.data
            lin.weight.data = (lin.weight.data.to(torch.float64) + d).to(lin.weight.dtype)
        yield model
    finally:
        for site, w in saved.items():
            _linear(model, *site).weight.data = w


@torch.no_grad()
def _reference(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their [new_tokens, V] float64 log-probs from ``model`` as it stands."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt_ids):].tolist()
    return tokens, _logprobs(model, prompt_ids, tokens)


@torch.no_grad()
def _logprobs(model, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Teacher-forced next-token log-probs [len(tokens), V] float64 at each generated position."""
    seq = torch.tensor([prompt_ids + tokens[:-1]])
    logits = model(seq).logits[0, len(prompt_ids) - 1:].to(torch.float64)
    return torch.log_softmax(logits, dim=-1)


def reference_outputs(model, prompts: list[list[int]], new_tokens: int,
                      done: Callable[[], None] = lambda: None) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt, the greedy tokens of ``model`` as it stands and their [new_tokens, V] float64
    next-token log-probs (the uncompressed side of :func:`compare_outputs`); ``done`` is called
    after each prompt (progress)."""
    refs = []
    for p in prompts:
        refs.append(_reference(model, p, new_tokens))
        done()
    return refs


def compare_outputs(model, prompts: list[list[int]], refs,
                    done: Callable[[], None] = lambda: None) -> tuple[float, float, int]:
    """(agreement, mean KL, positions) of ``model`` as it stands against ``refs`` (from
    :func:`reference_outputs` on the same prompts), teacher-forced on the reference tokens: each
    position sees the reference's context, so one flipped near-tie costs one position, not the rest.
    ``done`` is called after each prompt (progress)."""
    agree, kl, count = 0, 0.0, 0
    for p, (tokens, ref_lp) in zip(prompts, refs):
        lp = _logprobs(model, p, tokens)
        # PEFT's own greedy choice in this context, not the generated token: generation runs with
        # min_new_tokens, which forbids EOS, so where PEFT's argmax is EOS the token is the runner-up
        agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
        kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
        count += len(tokens)
        done()
    return agree / count, kl / count, count


def output_quality(model, prompts: list[list[int]], new_tokens: int, reference, compressed,
                   done: Callable[[], None] = lambda: None) -> tuple[float, float, int]:
    """(agreement, mean KL, positions) of the compressed adapter against the uncompressed one.

    Args:
        model: the transformers (or PEFT) model.
        prompts: held prompts as token ids.
        new_tokens: greedy tokens generated per prompt by the reference.
        reference, compressed: zero-argument context-manager factories that put ``model`` into
            the uncompressed / compressed state for the duration of the block.
        done: called after each of the 2 x len(prompts) passes (reference, then compressed), so a
            progress bar can estimate the time left from the first prompt on.
    """
    with reference():
        refs = reference_outputs(model, prompts, new_tokens, done)
    with compressed():
        return compare_outputs(model, prompts, refs, done)


def format_table(rows: list[AdapterQuality]) -> str:
    """A fixed-width table: adapter, mean / worst relative error, agreement, KL, gate."""
    lines = [f"{'adapter':<24} {'rel.err mean':>12} {'rel.err max':>11} {'agree':>7} {'KL':>9} {'ref':>6}  gate"]
    for r in rows:
        worst = max(v["max"] for v in r.rel_error.values())
        agree = "-" if r.agreement is None else f"{100 * r.agreement:.1f}%"
        kl = "-" if r.kl is None else f"{r.kl:.4f}"
        gate = "-" if r.agreement is None else ("pass" if r.passes else "FAIL")
        lines.append(f"{r.name:<24} {r.rel_error_mean:>12.4f} {worst:>11.4f} {agree:>7} {kl:>9} {r.reference:>6}  {gate}")
    return "\n".join(lines)


def as_json(rows: list[AdapterQuality]) -> list[dict]:
    """The rows as JSON-ready dicts (with the gate verdict)."""
    return [{**asdict(r), "passes": r.passes} for r in rows]


def is_plain_lora(adapter_dir: Path) -> bool:
    """True when the folder holds no lora_N (PEFT can load it as a LoRA); only its header is read
    (read(2), not memory-mapped: see format.py).

    Raises:
        AdapterError: the weights file's header cannot be read, naming it.
    """
    from nlora_serve.adapters.format import read_header

    return not any(k.endswith("lora_N.weight") for k in read_header(Path(adapter_dir) / "adapter_model.safetensors"))
