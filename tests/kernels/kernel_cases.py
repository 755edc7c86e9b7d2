"""Random adapter batches for the kernel tests, and their float64 truth.

Every case draws fresh inputs from its own seed. Free slots and families are NaN-filled, so a
leak of an unused row shows up as NaN in the result. The truth is computed per token from the raw
per-slot matrices (not from the pools or the metadata): delta[t] = s · B N A x[t].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nlora_serve.kernels import KernelSiteWeights, build_adapter_batch
from nlora_serve.kernels.metadata import TIED

TEST_DEVICE = os.environ.get("NLORA_TEST_DEVICE", "cpu")  # see conftest.py
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DISTS = ("distinct", "one", "zipf", "skewed", "with_none", "none")
PATHS = ("tied", "own", "shared", "mixed")


@dataclass
class Case:
    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, out] base output (a column view of a wider buffer when fused)
    site: KernelSiteWeights
    token_slots: torch.Tensor  # [T] int64
    slot_ranks: torch.Tensor
    slot_scalings: torch.Tensor
    slot_families: torch.Tensor
    truth: torch.Tensor  # [T, out] float64 delta

    def batch(self, device=None):
        return build_adapter_batch(self.token_slots, self.slot_ranks, self.slot_scalings,
                                   self.slot_families, device=device)


def draw_slots(gen: torch.Generator, num_tokens: int, num_slots: int, dist: str) -> torch.Tensor:
    """Token slots [T] int64 in [-1, num_slots) following a popularity distribution."""
    if dist == "none":
        return torch.full((num_tokens,), -1, dtype=torch.int64)
    if dist == "one":
        return torch.full((num_tokens,), int(torch.randint(num_slots, (1,), generator=gen)))
    if dist == "distinct":
        reps = -(-num_tokens // num_slots)
        order = torch.randperm(num_slots, generator=gen).repeat(reps)[:num_tokens]
        return order[torch.randperm(num_tokens, generator=gen)]
    if dist == "zipf":
        p = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.2
    else:  # skewed or with_none: one hot tenant, a uniform tail
        p = torch.full((num_slots,), 0.1 / max(num_slots - 1, 1), dtype=torch.float64)
        p[0] = 0.9
    slots = torch.randperm(num_slots, generator=gen)[
        torch.multinomial(p, num_tokens, replacement=True, generator=gen)]
    if dist == "with_none":
        slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
    return slots


def _family_of(path: str, slot: int, gen: torch.Generator) -> int:
    if path == "mixed":
        path = ("tied", "own", "shared")[int(torch.randint(3, (1,), generator=gen))]
    return {"tied": TIED, "own": 2 + slot, "shared": 1}[path]


def make_case(seed: int, num_tokens: int, dim_in: int, dim_out: int, ranks: tuple[int, ...],
              dist: str, path: str, dtype: torch.dtype, *, width: int | None = None,
              bias: bool = False, fused: bool = False, num_used: int | None = None,
              scaling: float | None = None, tied_bt: bool = False, device: str = "cpu") -> Case:
    """One random batch: ``num_used`` tenants (default min(T, 12)) plus 3 NaN-filled free slots.

    ranks: cycled over the slots (mixed ranks); width: the pools' rank width R (≥ max rank);
    scaling: one scaling for every slot (default: random per slot); tied_bt: hand the site a
    contiguous copy of tied_b's transpose, as TiedPool does. device: where x, y and the pools
    live (drawn on the CPU, so a case is the same on every device); truth stays on the CPU.
    """
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    num_used = num_used or min(num_tokens, 12)
    num_slots, width = num_used + 3, width or max(ranks)
    # |y| ≈ 0.5 and every delta ≳ |y|: bf16 rounding of y itself must not dominate the
    # measured error (it is 2^-9 · |y| per element, on a delta measured as y_after − y_before).
    weight = rnd(dim_out, dim_in, scale=0.5 * dim_in ** -0.5)
    b_vec = rnd(dim_out, scale=0.2) if bias else None  # large enough that ignoring it fails
    x = rnd(num_tokens, dim_in)
    nan = float("nan")
    n_pool = torch.full((num_slots, width, width), nan, dtype=dtype)
    a_pool = torch.full((num_slots + 2, width, dim_in), nan, dtype=dtype)
    b_pool = torch.full((num_slots + 2, dim_out, width), nan, dtype=dtype)
    ranks_t = torch.zeros(num_slots, dtype=torch.int64)
    fams = torch.zeros(num_slots, dtype=torch.int64)
    scal = torch.rand(num_slots, generator=gen) + 0.5
    if scaling is not None:
        scal = torch.full((num_slots,), scaling)
    a_raw, b_raw, n_raw = {}, {}, {}
    shared = (rnd(width, dim_in, scale=dim_in ** -0.5), rnd(dim_out, width))
    for slot in range(num_used):
        r = ranks[slot % len(ranks)]
        fam = _family_of(path, slot, gen)
        ranks_t[slot], fams[slot] = r, fam
        # Tied B = W[:, :r] is small (~1/sqrt(in)); a larger N keeps the delta near |y| so bf16
        # rounding of y stays well inside the tolerance.
        n_scale = 2 * (dim_in ** 0.5) / r if fam == TIED else r ** -0.5
        n_raw[slot] = rnd(r, r, scale=n_scale)
        n_pool[slot].zero_()[:r, :r] = n_raw[slot]
        if fam == TIED:
            a_raw[slot], b_raw[slot] = weight[:r], weight[:, :r]
            continue
        if fam == 1:  # the shared family holds its widest rank; each slot's N trims it
            a_full, b_full = shared
            a_pool[fam], b_pool[fam] = a_full, b_full
        else:
            a_full = rnd(width, dim_in, scale=dim_in ** -0.5)
            b_full = rnd(dim_out, width, scale=r ** -0.5)
            a_pool[fam].zero_()[:r] = a_full[:r]
            b_pool[fam].zero_()[:, :r] = b_full[:, :r]
        a_raw[slot], b_raw[slot] = a_full[:r], b_full[:, :r]
    ranks_t[num_used:] = 1 << 30  # free slots: a rank no batch may read
    fams[num_used:] = 10_000
    slots = draw_slots(gen, num_tokens, num_used, dist)
    y_base = (x.double() @ weight.double().t()) + (0 if b_vec is None else b_vec.double())
    y = _output_buffer(y_base.to(dtype).to(device), fused)
    truth = torch.zeros(num_tokens, dim_out, dtype=torch.float64)
    for t in range(num_tokens):
        s = int(slots[t])
        if s >= 0:
            z = a_raw[s].double() @ x[t].double()
            truth[t] = float(scal[s]) * (b_raw[s].double() @ (n_raw[s].double() @ z))
    x, weight, n_pool, a_pool, b_pool = (t.to(device) for t in (x, weight, n_pool, a_pool, b_pool))
    b_vec = None if b_vec is None else b_vec.to(device)
    site = KernelSiteWeights(n_pool=n_pool, a_pool=a_pool, b_pool=b_pool, tied_b=weight[:, :width],
                       tied_a=weight[:width],
                       tied_bias=None if b_vec is None else b_vec[:width],
                       tied_bt=weight[:, :width].t().contiguous() if tied_bt else None)
    return Case(x, y, site, slots, ranks_t, scal, fams, truth)


def _output_buffer(y: torch.Tensor, fused: bool) -> torch.Tensor:
    """y itself, or y placed as a column view inside a wider fused output (like qkv)."""
    if not fused:
        return y.clone()
    wide = torch.full((y.shape[0], y.shape[1] + 37), float("nan"), dtype=y.dtype, device=y.device)
    wide[:, 11:11 + y.shape[1]] = y
    return wide[:, 11:11 + y.shape[1]]


def delta_error(y_before: torch.Tensor, y_after: torch.Tensor, truth: torch.Tensor) -> float:
    """‖(y_after − y_before) − truth‖ / ‖truth‖ in float64 (absolute when truth is 0)."""
    err = (y_after.double() - y_before.double() - truth).norm()
    ref = truth.norm()
    return float(err / ref) if ref > 0 else float(err)
