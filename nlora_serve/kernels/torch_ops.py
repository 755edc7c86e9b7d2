"""The torch adapter path: all slots of a step at once, no Python loop over slots or tokens.

The engine runs it on the CPU when the native ops are absent (``kernel_backend="torch"``, or no
C library could be built or loaded) and for any projection the native ops do not serve
(engine/model/adapter_layer.py); with the native ops loaded, CPU steps otherwise run kernels/cpu/native.py.

Per site the tied path is one gather of N per token, one batched r×r product and one dense
[T, r]×[r, out] GEMM that adds into y; the group path is one padded batched GEMM per factor over
the step's families (one family, e.g. a single adapter, is a plain GEMM). Masking is by indexing,
never by multiplying with 0, so a NaN in a free slot cannot reach any token.

Why the code looks the way it does (measured on a 2-core AVX512-BF16 CPU, T = 64, r = 16; see
bench/RESULTS.md "Kernels"): at these sizes every torch op costs a few µs of fixed overhead and
a bf16 GEMM through oneDNN ~15 µs more than fp32 MKL, so the path minimises op count. The r×r
mix always runs in fp32 (a tiny bf16 bmm is 3× slower than widening) and the scaling is folded
into the one op that narrows u back, so every bf16 expand is an alpha = 1 addmm (alpha ≠ 1 costs
oneDNN ~4 µs more per call).
"""

from __future__ import annotations

import torch

from nlora_serve.kernels.metadata import AdapterBatch
from nlora_serve.kernels.weights import KernelSiteWeights

_WIDE = (torch.float32, torch.float64)  # dtypes whose small GEMMs MKL runs directly


def apply_torch(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch,
                site: KernelSiteWeights) -> torch.Tensor:
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
    tied = _tied_mix(y, batch, site, r) if batch.num_tied else None  # z read before any add
    if batch.num_group:
        _group_add(y, x, batch, site, r)
    if tied is not None:
        _tied_add(y, tied, batch, site, r)
    return y


def _square(n: torch.Tensor, r: int) -> torch.Tensor:
    """n[..., :r, :r], without a slicing op when r is already the full width."""
    return n if n.shape[-1] == r else n[..., :r, :r]


def _mix(z: torch.Tensor, n: torch.Tensor, slots: torch.Tensor, single_slot: int,
         scale: float | torch.Tensor) -> tuple[torch.Tensor, float]:
    """u[t] = scale[t] · N[slots[t]] z[t], returned as (u · 1/alpha, alpha) for the expand GEMM.

    z [Tp, r] (n's dtype, or fp32 already widened; any strides), n [S, r, r] (view), slots [Tp]
    int64, scale a float or [Tp, 1] fp32 → u [Tp, r] in n's dtype, a fresh tensor. fp32/fp64
    leave a uniform scale to the GEMM's alpha (free in MKL); narrow dtypes multiply and scale in
    fp32, then narrow u once, so their expand runs with alpha = 1.
    """
    dtype = n.dtype
    if dtype in _WIDE:
        if single_slot >= 0:
            u = z @ n[single_slot].t()
        else:
            u = torch.bmm(n.index_select(0, slots), z.unsqueeze(2)).squeeze(2)
        return (u, scale) if isinstance(scale, float) else (u.mul_(scale), 1.0)
    zf = z.float()
    if single_slot >= 0:
        uf = zf @ n[single_slot].t().float()
    else:
        uf = torch.bmm(n.index_select(0, slots).float(), zf.unsqueeze(2)).squeeze(2)
    if not (isinstance(scale, float) and scale == 1.0):  # pools fold s into N: s = 1 there
        uf.mul_(scale)
    return uf.to(dtype), 1.0


def _scaling(batch: AdapterBatch, per_token: torch.Tensor) -> float | torch.Tensor:
    """The uniform scaling as a float, else the [Tp, 1] per-token scalings."""
    return per_token if batch.uniform_scaling is None else batch.uniform_scaling


def _tied_mix(y: torch.Tensor, batch: AdapterBatch, site: KernelSiteWeights,
              r: int) -> tuple[torch.Tensor, float]:
    """(u, alpha): alpha · u = s · N z, z = (y − bias)[:, :r] of the tied tokens. u [Tt, r]."""
    z = y[:, :r] if batch.tied_index is None else y[:, :r].index_select(0, batch.tied_index)
    if site.tied_bias is not None:
        bias = site.tied_bias[:r]
        # Narrow dtypes subtract in fp32: the mix widens z anyway, and it is more exact.
        z = z - bias if z.dtype in _WIDE else z.float() - bias.float()
    # u is always a fresh tensor, so the adds into y that follow cannot change it.
    return _mix(z, _square(site.n_pool, r), batch.tied_slots, batch.single_slot,
                _scaling(batch, batch.tied_scalings))


def _add_rows(y: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, alpha: float) -> None:
    """y[index] += alpha · delta for unique row indices [n] and delta [n, out].

    index_add_ into a strided column view of a fused output is 3-6× slower than gathering the
    rows, adding and writing them back (measured at T = 64, out 576-1536), so views take that form.
    """
    if y.is_contiguous():
        y.index_add_(0, index, delta, alpha=alpha)
    else:
        y.index_put_((index,), torch.add(y.index_select(0, index), delta, alpha=alpha))


def _tied_bt(site: KernelSiteWeights, r: int) -> torch.Tensor:
    """B^T [r, out] = W[:, :r]^T: the caller's contiguous copy if any, else a strided view."""
    if site.tied_bt is not None:
        return site.tied_bt[:r]
    return site.tied_b[:, :r].t()  # BLAS reads the transposed view without a copy


def _tied_add(y: torch.Tensor, mixed: tuple[torch.Tensor, float], batch: AdapterBatch,
              site: KernelSiteWeights, r: int) -> None:
    (u, alpha), bt = mixed, _tied_bt(site, r)
    if batch.tied_index is None:
        y.addmm_(u, bt, alpha=alpha)
    else:
        _add_rows(y, batch.tied_index, u @ bt, alpha)


def _group_add(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, site: KernelSiteWeights,
               r: int) -> None:
    """Shrink, mix and expand for the group tokens (family ≥ 0), added into y."""
    a, b, n = site.a_pool[:, :r], site.b_pool[:, :, :r], _square(site.n_pool, r)
    fams = batch.group_families
    if fams.numel() == 1:
        _one_family_add(y, x, batch, a[int(fams[0])], b[int(fams[0])], n)
        return
    num_fam, pad = fams.numel(), batch.group_pad_len
    xp = x.index_select(0, batch.group_pad_src).view(num_fam, pad, -1)  # [G, L, in]
    zp = torch.bmm(xp, a.index_select(0, fams).transpose(1, 2))  # [G, L, r]
    z = zp.view(num_fam * pad, r).index_select(0, batch.group_pad_pos)  # [Tg, r]
    u, alpha = _mix(z, n, batch.group_slots, batch.single_slot,
                    _scaling(batch, batch.group_scalings))
    up = u.new_zeros(num_fam * pad, r).index_copy_(0, batch.group_pad_pos, u)
    out = torch.bmm(up.view(num_fam, pad, r), b.index_select(0, fams).transpose(1, 2))
    out = out.view(num_fam * pad, -1)  # [G·L, out]
    if batch.group_token_pad_pos is not None:
        # Every token is a group token: gather the delta in token order and add it densely;
        # index_add_ into a strided bf16 column view (a fused output) is ~4× slower.
        y.add_(out.index_select(0, batch.group_token_pad_pos), alpha=alpha)
    else:
        _add_rows(y, batch.group_index, out.index_select(0, batch.group_pad_pos), alpha)


def _one_family_add(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, a: torch.Tensor,
                    b: torch.Tensor, n: torch.Tensor) -> None:
    """The group path when one family (e.g. one adapter) serves every group token: dense GEMMs."""
    every = batch.num_group == batch.num_tokens  # then group_index is 0..T−1 in order
    xs = x if every else x.index_select(0, batch.group_index)
    u, alpha = _mix(xs @ a.t(), n, batch.group_slots, batch.single_slot,
                    _scaling(batch, batch.group_scalings))
    if every:
        y.addmm_(u, b.t(), alpha=alpha)
    else:
        _add_rows(y, batch.group_index, u @ b.t(), alpha)
