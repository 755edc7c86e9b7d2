"""The CPU path the engine runs: all slots of a step at once, no Python loop over slots or tokens.

Per site the tied path is one gather of N per token, one batched r×r product and one dense
[T, r]×[r, out] GEMM that adds into y; the group path is one padded batched GEMM per factor over
the step's families (one family, e.g. a single adapter, is a plain GEMM). Masking is by indexing,
never by multiplying with 0, so a NaN in a free slot cannot reach any token.
"""

from __future__ import annotations

import torch

from nlora_serve.kernels.metadata import AdapterBatch
from nlora_serve.kernels.weights import SiteWeights


def apply_torch(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch,
                site: SiteWeights) -> torch.Tensor:
    """Add every token's adapter delta into the base output, in place.

    Semantics: y[t] += s[slot] · B[slot] N[slot] A[slot] x[t] for each token t with slot ≥ 0,
    where a tied slot uses A x = (y_base[t] − bias)[:r] and B = tied_b; other rows untouched.

    Args:
        y: [T, out] base output of this projection (may be a column view of a fused output),
            modified in place. Same dtype as x and the pools.
        x: [T, in] the projection's input.
        batch: the step's metadata.
        site: this projection's pools.

    Returns:
        y (the same tensor).
    """
    if batch.is_empty:
        return y
    r = batch.max_rank
    u_tied = _tied_mix(y, batch, site, r) if batch.num_tied else None  # z read before any add
    if batch.num_group:
        _group_add(y, x, batch, site, r)
    if u_tied is not None:
        _tied_add(y, u_tied, batch, site, r)
    return y


def _mix(z: torch.Tensor, n: torch.Tensor, slots: torch.Tensor, single_slot: int) -> torch.Tensor:
    """u[t] = N[slots[t]] z[t]. z [Tp, r], n [S, r, r] (view), slots [Tp] int64 → u [Tp, r]."""
    if single_slot >= 0:
        return z @ n[single_slot].t()
    if z.dtype == torch.float32 or z.dtype == torch.float64:
        return torch.bmm(n.index_select(0, slots), z.unsqueeze(2)).squeeze(2)
    # CPU bf16/fp16 bmm on [T, r, r]×[T, r, 1] is ~3× slower than widening, multiplying in fp32
    # and narrowing back (measured 36 vs 12 us at T=64, r=16); it is also more exact.
    u = torch.bmm(n.index_select(0, slots).float(), z.float().unsqueeze(2)).squeeze(2)
    return u.to(z.dtype)


def _scale(u: torch.Tensor, batch: AdapterBatch, per_token: torch.Tensor) -> float:
    """Apply per-token scalings to u in place, or return the uniform scaling as a GEMM alpha."""
    if batch.uniform_scaling is not None:
        return batch.uniform_scaling
    u.mul_(per_token)
    return 1.0


def _tied_mix(y: torch.Tensor, batch: AdapterBatch, site: SiteWeights, r: int) -> torch.Tensor:
    """u = N z with z = (y − bias)[:, :r] of the tied tokens, copied out of y. → [Tt, r]."""
    z = y[:, :r] if batch.tied_index is None else y[:, :r].index_select(0, batch.tied_index)
    if site.tied_bias is not None:
        z = z - site.tied_bias[:r]
    u = _mix(z, site.n_pool[:, :r, :r], batch.tied_slots, batch.single_slot)
    # z may still be a view of y: u is a fresh tensor, so later adds into y cannot change it.
    return u


def _tied_add(y: torch.Tensor, u: torch.Tensor, batch: AdapterBatch, site: SiteWeights,
              r: int) -> None:
    alpha = _scale(u, batch, batch.tied_scalings)
    bt = site.tied_b[:, :r].t()  # [r, out], a strided view: BLAS reads it without a copy
    if batch.tied_index is None:
        y.addmm_(u, bt, alpha=alpha)
    else:
        y.index_add_(0, batch.tied_index, u @ bt, alpha=alpha)


def _group_add(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, site: SiteWeights,
               r: int) -> None:
    """Shrink, mix and expand for the group tokens (family ≥ 0), added into y."""
    a, b, n = site.a_pool[:, :r], site.b_pool[:, :, :r], site.n_pool[:, :r, :r]
    fams = batch.group_families
    if fams.numel() == 1:
        _one_family_add(y, x, batch, a[int(fams[0])], b[int(fams[0])], n)
        return
    num_fam, pad = fams.numel(), batch.group_pad_len
    xp = x.index_select(0, batch.group_pad_src).view(num_fam, pad, -1)  # [G, L, in]
    zp = torch.bmm(xp, a.index_select(0, fams).transpose(1, 2))  # [G, L, r]
    z = zp.view(num_fam * pad, r).index_select(0, batch.group_pad_pos)  # [Tg, r]
    u = _mix(z, n, batch.group_slots, batch.single_slot)
    alpha = _scale(u, batch, batch.group_scalings)
    up = u.new_zeros(num_fam * pad, r).index_copy_(0, batch.group_pad_pos, u)
    out = torch.bmm(up.view(num_fam, pad, r), b.index_select(0, fams).transpose(1, 2))
    delta = out.view(num_fam * pad, -1).index_select(0, batch.group_pad_pos)  # [Tg, out]
    y.index_add_(0, batch.group_index, delta, alpha=alpha)


def _one_family_add(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, a: torch.Tensor,
                    b: torch.Tensor, n: torch.Tensor) -> None:
    """The group path when one family (e.g. one adapter) serves every group token: dense GEMMs."""
    every = batch.num_group == batch.num_tokens  # then group_index is 0..T−1 in order
    xs = x if every else x.index_select(0, batch.group_index)
    u = _mix(xs @ a.t(), n, batch.group_slots, batch.single_slot)
    alpha = _scale(u, batch, batch.group_scalings)
    if every:
        y.addmm_(u, b.t(), alpha=alpha)
    else:
        y.index_add_(0, batch.group_index, u @ b.t(), alpha=alpha)
