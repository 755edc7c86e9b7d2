"""Torch reference ops, one per Triton op and with the same signature (DESIGN §4).

Written for clarity, not speed: loops over runs and tokens, maths in the inputs' dtype (pass
float64 tensors for a float64 reference). Tests hold the Triton ops to these, and these to a
per-token float64 formula. Token rows that an op does not cover are never written.
"""

from __future__ import annotations

import torch

from nlora_serve.kernels.metadata import NO_GROUP_KEY, AdapterBatch
from nlora_serve.kernels.weights import KernelSiteWeights


def _runs(seg_start: torch.Tensor, seg_len: torch.Tensor):
    for i in range(seg_start.numel()):
        start = int(seg_start[i])
        yield i, range(start, start + int(seg_len[i]))


def sgmv_shrink(x, a_pool, slot_families, seg_start, seg_len, seg_slot, max_seg_len, out,
                n_pool=None):
    """Semantics: out[t] = N[s] A[f] x[t] (or A[f] x[t] without n_pool) for t in each run,
    s = seg_slot[run], f = slot_families[s]; rows of tokens in no run are untouched.

    x [T, in], a_pool [F, R, in], n_pool [S, R, R] or None, slot_families [S] int,
    seg_start/seg_len/seg_slot [Ns] int, max_seg_len int (unused here), out [T, R] (written).
    """
    r = out.shape[1]
    for i, tokens in _runs(seg_start, seg_len):
        slot = int(seg_slot[i])
        a = a_pool[int(slot_families[slot]), :r]
        for t in tokens:
            z = a @ x[t]
            out[t] = z if n_pool is None else n_pool[slot, :r, :r] @ z
    return out


def bgmv_shrink(x, a_pool, tok_family, out, n_pool=None, tok_slot=None):
    """Semantics: out[t] = N[tok_slot[t]] A[tok_family[t]] x[t] for tokens with family ≥ 0
    (A x alone without n_pool); other rows untouched.

    x [T, in], a_pool [F, R, in], tok_family [T] int, out [T, R], n_pool [S, R, R] or None,
    tok_slot [T] int (needed with n_pool).
    """
    r = out.shape[1]
    for t in range(x.shape[0]):
        fam = int(tok_family[t])
        if fam < 0:
            continue
        z = a_pool[fam, :r] @ x[t]
        out[t] = z if n_pool is None else n_pool[int(tok_slot[t]), :r, :r] @ z
    return out


def mix(z, n_pool, tok_slot, out, bias=None):
    """Semantics: out[t] = N[tok_slot[t]] (z[t] − bias) for tokens with slot ≥ 0; other rows
    untouched. z [T, R] (any strides, e.g. y[:, :R]), n_pool [S, R, R], tok_slot [T] int,
    out [T, R] (a buffer distinct from z), bias [≥R] or None.
    """
    r = out.shape[1]
    for t in range(z.shape[0]):
        slot = int(tok_slot[t])
        if slot < 0:
            continue
        zt = z[t, :r] if bias is None else z[t, :r] - bias[:r]
        out[t] = n_pool[slot, :r, :r] @ zt
    return out


def sgmv_expand(u, b_pool, seg_start, seg_len, seg_family, max_seg_len, tok_slot,
                slot_scalings, y):
    """Semantics: y[t] += slot_scalings[tok_slot[t]] · B[f] u[t] for t in each run,
    f = seg_family[run] (row 0 when seg_family is None); other rows untouched.

    u [T, R], b_pool [F, out, R], seg_start/seg_len [Ns] int, seg_family [Ns] int or None,
    max_seg_len int (unused here), tok_slot [T] int, slot_scalings [S] float, y [T, out]
    (modified in place).
    """
    r = u.shape[1]
    for i, tokens in _runs(seg_start, seg_len):
        b = b_pool[0 if seg_family is None else int(seg_family[i]), :, :r]
        for t in tokens:
            y[t] += float(slot_scalings[int(tok_slot[t])]) * (b @ u[t])
    return y


def bgmv_expand(u, b_pool, tok_family, tok_slot, y, slot_scalings=None):
    """Semantics: y[t] += slot_scalings[tok_slot[t]] · B[f] u[t] for t with tok_slot[t] ≥ 0,
    f = tok_family[t] (row 0 when tok_family is None; scaling 1 when slot_scalings is None);
    other rows untouched.

    u [T, R], b_pool [F, out, R], tok_family [T] int or None, tok_slot [T] int, y [T, out]
    (modified in place), slot_scalings [S] float or None.
    """
    r = u.shape[1]
    for t in range(u.shape[0]):
        slot = int(tok_slot[t])
        if slot < 0:
            continue
        b = b_pool[0 if tok_family is None else int(tok_family[t]), :, :r]
        scale = 1.0 if slot_scalings is None else float(slot_scalings[slot])
        y[t] += scale * (b @ u[t])
    return y


def _rank(slot_ranks, slot: int, width: int) -> int:
    return width if slot_ranks is None else min(int(slot_ranks[slot]), width)


def grouped_shrink(x, a_pool, n_pool, order, key, tok_slot, out, slot_ranks=None):
    """Semantics: out[i] = [N[s][:r, :r] A[f][:r] x[t], 0…] for each sorted position i with key[i] = f
    ≠ NO_GROUP_KEY, t = order[i], s = tok_slot[t], r = min(slot_ranks[s], R) (R = out.shape[1]
    when slot_ranks is None); other rows untouched. Rows of ``out`` are sorted positions.

    x [T, in], a_pool [F, R, in], n_pool [S, R, R], order/key/tok_slot [T] int, out [T, R],
    slot_ranks [S] int or None.
    """
    width = out.shape[1]
    for i in range(x.shape[0]):
        if int(key[i]) == NO_GROUP_KEY:
            continue
        t = int(order[i])
        s = int(tok_slot[t])
        r = _rank(slot_ranks, s, width)
        out[i] = 0
        out[i, :r] = n_pool[s, :r, :r] @ (a_pool[int(key[i]), :r] @ x[t])
    return out


def grouped_expand(u, b_pool, order, key, tok_slot, y, slot_scalings=None, slot_ranks=None):
    """Semantics: y[t] += slot_scalings[s] · B[f][:, :r] u[i, :r] for each sorted position i with
    key[i] = f ≠ NO_GROUP_KEY, t = order[i], s = tok_slot[t], r as in :func:`grouped_shrink`
    (scaling 1 when slot_scalings is None); other rows untouched.

    u [T, R] (rows in sorted order), b_pool [F, out, R], order/key/tok_slot [T] int, y [T, out]
    (modified in place), slot_scalings [S] float or None, slot_ranks [S] int or None.
    """
    for i in range(u.shape[0]):
        if int(key[i]) == NO_GROUP_KEY:
            continue
        t = int(order[i])
        s = int(tok_slot[t])
        r = _rank(slot_ranks, s, u.shape[1])
        scale = 1.0 if slot_scalings is None else float(slot_scalings[s])
        y[t] += scale * (b_pool[int(key[i]), :, :r] @ u[i, :r])
    return y


def apply_reference(y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch,
                    site: KernelSiteWeights) -> torch.Tensor:
    """The dispatch entry composed of the reference ops (same composition as the Triton path).

    Semantics: as :func:`nlora_serve.kernels.torch_ops.apply_torch`; y modified in place.
    """
    if batch.is_empty:
        return y
    r, num = batch.max_rank, batch.num_tokens
    u_tied = mix(y[:, :r], site.n_pool, batch.tok_tied_slot, y.new_zeros(num, r), site.tied_bias)
    if batch.num_group:
        u = sgmv_shrink(x, site.a_pool, batch.slot_families, batch.seg_start, batch.seg_len,
                        batch.seg_slot, batch.max_seg_len, y.new_zeros(num, r), site.n_pool)
        sgmv_expand(u, site.b_pool, batch.fseg_start, batch.fseg_len, batch.fseg_family,
                    batch.max_fseg_len, batch.tok_group_slot, batch.slot_scalings, y)
    if batch.num_tied:
        sgmv_expand(u_tied, site.tied_b[None], batch.tseg_start, batch.tseg_len, None,
                    batch.max_tseg_len, batch.tok_tied_slot, batch.slot_scalings, y)
    return y
