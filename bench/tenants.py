"""Tenant mixes for the benchmarks (DESIGN §9): tied IntTune tenants and LoRA tenants.

Every tenant is r = 16 on all seven projections of every layer. Tied tenants start from the
Nyström init with N perturbed (so their outputs differ); LoRA tenants are SLoRA-initialised with
a non-zero B. Each is written twice: as registered with our server, and folded to plain PEFT LoRA
for the peers (exact: B' = B·N).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nlora_serve.adapters.convert import to_lora
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.save import write_adapter
from nlora_serve.models.base import BaseModel

MIXES = ("none", "tied64", "lora8")


def _perturb(adapter, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for site in adapter.sites.values():
        site.N = site.N + scale * torch.randn(site.N.shape, generator=gen, dtype=site.N.dtype)
        site.has_n = True
        if not adapter.is_tied:
            site.B = site.B + scale * torch.randn(site.B.shape, generator=gen, dtype=site.B.dtype)


def make_tenant(base: BaseModel, kind: str, seed: int):
    """One tenant: ``kind`` "tied" (Nyström init, N perturbed) or "lora" (SLoRA init, B random)."""
    variant = "nlora" if kind == "tied" else "slora"
    adapter = init_adapter(base, rank=16, targets="all-linear", variant=variant, seed=seed, alpha=16)
    _perturb(adapter, seed, 0.02 if kind == "tied" else 0.01)
    return adapter


def write_mix(base: BaseModel, mix: str, out: Path, fold: bool = True) -> tuple[list[Path], list[Path]]:
    """Write a mix's tenants: (dirs for our server, the same folded to plain LoRA for peers; none
    without ``fold``: at the 8B shape 64 folded tenants are 9 GB of files no peer reads)."""
    if mix == "none":
        return [], []
    kind, count = ("tied", 64) if mix == "tied64" else ("lora", 8)
    ours, folded = [], []
    for i in range(count):
        adapter = make_tenant(base, kind, seed=i)
        # tied tenants in the compact form (N only, as served from the store): the full form would
        # repeat W's slices per tenant, 11 GB for 64 tenants at the 8B shape
        ours.append(write_adapter(adapter, out / mix / f"t{i}", tied_form=adapter.is_tied))
        if fold:
            folded.append(write_adapter(to_lora(adapter, base), out / f"{mix}-lora" / f"t{i}"))
    return ours, folded
