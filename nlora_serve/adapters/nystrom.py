"""``adapters init``: NLoRA (Nyström), NLoRA-pinv and SLoRA adapters from the base weights.

Source: NLoRA (Guo, Wu, Chang, arXiv 2502.14482) and its reference code
(github TracyGuo2001/NLoRA, ``LoraLayer.nlora_init`` / ``slora_init``):

- ``nlora`` (reference): A = W[:r, :], N = W[:r, :r], B = W[:, :r]
- ``nlora-pinv`` (classical Nyström): A and B as above, N = pinv(W[:r, :r])
- ``slora``: A and N kaiming-uniform (a = √5, as nn.Linear), B = 0, so the delta starts at zero

The Nyström variants are tied (A and B are the base's slices): IntTune then trains only N. Their
N is a starting point for training, not a tenant: at scaling 1, B·N·A with N = W[:r, :r] changes
every answer. ``zero_n=True`` writes N = 0 instead, so the adapter leaves the model unchanged, as
PEFT's default init (B = 0) does; ``adapters init`` does that unless told it is a training start.
"""

from __future__ import annotations

import math

import torch

from nlora_serve.adapters.adapter import Adapter, SiteWeights
from nlora_serve.adapters.config import ALL_LINEAR, parse_config, plan_sites
from nlora_serve.adapters.loader import assemble_adapter
from nlora_serve.errors import AdapterError
from nlora_serve.models.base import BaseModel
from nlora_serve.models.spec import PROJECTIONS

INIT_VARIANTS = ("nlora", "nlora-pinv", "slora")
# init_lora_weights as the NLoRA reference code names them (its PEFT fork reads these).
_PEFT_INIT = {"nlora": "n_lora", "nlora-pinv": "n_lora", "slora": "s_lora"}


def init_config(base: BaseModel, *, rank: int, targets: list[str] | str, variant: str,
                layers: list[int] | None = None, alpha: float | None = None, use_rslora: bool = False) -> dict:
    """The adapter_config.json object for a fresh adapter (PEFT LoRA fields; alpha defaults to r).

    Raises:
        AdapterError: unknown variant or target, or a layer index out of range.
    """
    if variant not in INIT_VARIANTS:
        raise AdapterError(f"init variant {variant!r} is not one of {', '.join(INIT_VARIANTS)}")
    names = [targets] if isinstance(targets, str) else list(targets)
    if names != [ALL_LINEAR] and (not names or any(t not in PROJECTIONS for t in names)):
        raise AdapterError(f"targets {names!r}: expected {ALL_LINEAR!r} or names from {', '.join(PROJECTIONS)}")
    bad = [i for i in layers or () if not 0 <= i < base.spec.num_layers]
    if bad:
        raise AdapterError(f"layers {bad}: out of range, the model has {base.spec.num_layers} layers")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base.path.name,  # no machine-specific path
        "r": rank, "lora_alpha": rank if alpha is None else alpha,
        "target_modules": ALL_LINEAR if names == [ALL_LINEAR] else names,
        "layers_to_transform": sorted(layers) if layers else None, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": use_rslora, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": _PEFT_INIT[variant], "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "lora_bias": False,
    }


def _site_tensors(w: torch.Tensor, r: int, variant: str, gen: torch.Generator):
    """(A [r, in], N [r, r], B [out, r]) in float32 on the CPU from the base weight W [out, in]
    (on any device: only its first r rows and columns are read, so an 8B model's init is cheap)."""
    if variant == "slora":
        a, n = torch.empty(r, w.shape[1]), torch.empty(r, r)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        torch.nn.init.kaiming_uniform_(n, a=math.sqrt(5), generator=gen)
        return a, n, torch.zeros(w.shape[0], r)
    rows, cols = w[:r, :].to("cpu", torch.float64), w[:, :r].to("cpu", torch.float64)
    n = torch.linalg.pinv(rows[:, :r]) if variant == "nlora-pinv" else rows[:, :r]
    return rows.float(), n.float(), cols.float()


def init_adapter(base: BaseModel, *, rank: int, targets: list[str] | str, variant: str = "nlora",
                 layers: list[int] | None = None, alpha: float | None = None, seed: int = 0,
                 use_rslora: bool = False, zero_n: bool = False) -> Adapter:
    """A fresh adapter for ``base``; see the module docstring for the variants.

    Args:
        rank: r of every site (1 ≤ r ≤ min(out, in) of each targeted projection).
        targets: projection names (``q_proj`` ...) or ``"all-linear"``.
        layers: layer indices to adapt (None: all).
        alpha: lora_alpha (default r, so s = 1).
        seed: RNG seed for ``slora``.
        zero_n: N = 0 at every site (the adapter's delta B·N·A is exactly zero).

    Raises:
        AdapterError: bad variant, target, layer or rank (named, with the module's shape).
    """
    cfg = parse_config(init_config(base, rank=rank, targets=targets, variant=variant, layers=layers,
                                   alpha=alpha, use_rslora=use_rslora))
    gen = torch.Generator().manual_seed(seed)
    sites = {}
    for site, plan in plan_sites(cfg, base.spec).items():
        out, inp = base.spec.projection_shape(plan.module)
        if plan.rank > min(out, inp):
            raise AdapterError(f"rank {plan.rank} exceeds {plan.module}'s shape [out={out}, in={inp}]")
        a, n, b = _site_tensors(base.weight(*site), plan.rank, variant, gen)
        n = torch.zeros_like(n) if zero_n else n
        sites[site] = SiteWeights(layer=plan.layer, module=plan.module, rank=plan.rank, scaling=plan.scaling,
                                  A=a, N=n, B=b)
    return assemble_adapter(cfg, sites, base, base.dtype, source=f"init:{variant}")
