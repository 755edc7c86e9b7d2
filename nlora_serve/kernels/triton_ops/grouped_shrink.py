"""Grouped shrink (+ fused mix): u = N A x over blocks of family-sorted tokens (SGMV-style, any T).

The per-token BGMV shrink (bgmv_shrink.py) reads A once per token. Here tokens are visited in
family-sorted order (metadata.sort_group_tokens, built on the device) in blocks of BLOCK_T sorted
positions; a program takes one block and one K range, finds the families present in its block
from the sorted keys themselves (at most BLOCK_T, usually one or two), and for each loads that
family's A tile once and multiplies the family's rows of x by it with tl.dot. So A is read once
per block of its tokens (and per K range), whatever the tenant mix, and the grid,
(⌈T / BLOCK_T⌉, K splits), depends on shapes only: no counts or starts from the host, no program
without a token block (vLLM's punica SGMV launches max_loras × ⌈T / BLOCK_M⌉ programs, most of which
exit at decode). Mixed ranks: A rows beyond the block family's largest slot rank are not read.

The mix u = N z (N per token's slot) is linear, so each K range's partial z is mixed at once and
the partial u's are summed with fp32 atomic adds into a zeroed u; with one K range (prefill-sized
T) it is a plain store. K splits exist for decode: ⌈64 / 16⌉ = 4 token blocks alone would leave
most of the GPU idle through a 14336-long K loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import dot_f32, load_tile
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows
from nlora_serve.kernels.metadata import NO_GROUP_KEY

_NONE = tl.constexpr(NO_GROUP_KEY)


@triton.jit
def _grouped_shrink_kernel(
        x_ptr, a_ptr, n_ptr, order_ptr, key_ptr, slot_ptr, rank_ptr, u_ptr, T, K, R, K_SPLIT,
        sx_t, sx_k, sa_f, sa_r, sa_k, sn_s, sn_i, sn_j, su_t, su_r,
        HAS_RANKS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    pos = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    keys = tl.load(key_ptr + pos, mask=pos < T, other=_NONE)
    fam = tl.min(keys, axis=0)
    if fam < _NONE:  # a block past the group tokens does nothing at all
        valid = keys < _NONE
        tok = tl.load(order_ptr + pos, mask=valid, other=0).to(tl.int64)
        slots = tl.load(slot_ptr + tok, mask=valid, other=0).to(tl.int64)
        if HAS_RANKS:
            ranks = tl.minimum(tl.load(rank_ptr + slots, mask=valid, other=0), R)
        else:
            ranks = tl.where(valid, R, 0)
        offs_r = tl.arange(0, BLOCK_R)
        k_lo = tl.program_id(1) * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        while fam < _NONE:  # the families of this block, ascending (the keys are sorted)
            rows = keys == fam  # other rows load as 0 below, so their z rows gain nothing
            mask_r = offs_r < tl.max(tl.where(rows, ranks, 0), axis=0)
            for k0 in range(k_lo, k_hi, BLOCK_K):  # K_SPLIT is a multiple of BLOCK_K
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K  # (not k_hi: K's divisibility by 16 is what lets loads vectorise)
                xt = load_tile(x_ptr, tok, offs_k, sx_t, sx_k, rows, mask_k)  # [BT, BK]
                at = load_tile(a_ptr + fam.to(tl.int64) * sa_f, offs_k, offs_r, sa_k, sa_r, mask_k, mask_r)
                z += dot_f32(xt, at)  # [BT, BR]
            fam = tl.min(tl.where(keys > fam, keys, _NONE), axis=0)
        # u[t] = N[slot(t)] z[t], each token its own N: a [BT, BI, BR] product per chunk of u's
        # columns (r ≤ 128; a 16-row tl.dot per token would waste 15/16 of it). N's entries beyond
        # the token's rank are zero by the pool contract: not read.
        mask_j = tl.arange(0, BLOCK_R)[None, None, :] < ranks[:, None, None]
        for i0 in tl.static_range(0, BLOCK_R, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            n = tl.load(n_ptr + slots[:, None, None] * sn_s + offs_i[None, :, None] * sn_i
                        + tl.arange(0, BLOCK_R)[None, None, :] * sn_j,
                        mask=mask_j & (offs_i[None, :, None] < ranks[:, None, None]), other=0.0)
            u = tl.sum(n.to(tl.float32) * z[:, None, :], axis=2)  # [BT, BI]
            ptrs = u_ptr + pos[:, None] * su_t + offs_i[None, :] * su_r
            mask = valid[:, None] & (offs_i < R)[None, :]
            if ATOMIC:  # partial u of this K range: the K ranges' sum is N z (the mix is linear)
                tl.atomic_add(ptrs, u, mask=mask)
            else:
                tl.store(ptrs, u, mask=mask)


def grouped_shrink(x: torch.Tensor, a_pool: torch.Tensor, n_pool: torch.Tensor, order: torch.Tensor,
                   key: torch.Tensor, tok_slot: torch.Tensor, out: torch.Tensor,
                   slot_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Shrink and mix every group token into ``out`` in family-sorted row order; returns ``out``.

    Semantics: for each sorted position i with key[i] = f ≠ NO_GROUP_KEY and token t = order[i],
    s = tok_slot[t], r = min(slot_ranks[s], R) (R when slot_ranks is None), R = out.shape[1]:
    out[i, :r] = N[s][:r, :r] · A[f][:r] · x[t] and out[i, r:R] = 0; rows of other positions are
    unspecified (never read by :func:`~nlora_serve.kernels.triton_ops.grouped_expand.grouped_expand`). Note
    the row of ``out`` is the sorted position i, not the token t. fp32 accumulation; with K split
    over programs, ``out`` is zeroed and the partial sums are added atomically (so the last bits
    may differ run to run).

    Args:
        x: [T, in] float (fp32/bf16/fp16), any strides.
        a_pool: [F, ≥R, in], n_pool: [S, ≥R, ≥R], x's dtype, any strides.
        order, key: [T] int32 from :func:`~nlora_serve.kernels.metadata.sort_group_tokens`.
        tok_slot: [T] int32, the slot of each group token (token order).
        out: [T, R] float32, R ≥ 1, any strides; must not overlap x. slot_ranks: [S] int32 or None.

    Raises:
        TypeError / ValueError: dtype or shape mismatch (named in the message).
    """
    num, dim_in = x.shape
    rank = out.shape[1]
    check_float("x", x, a_pool.dtype)
    check_rows("out", out, num)
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32 (partial sums add into it), got {out.dtype}")
    check_float("n_pool", n_pool, a_pool.dtype)
    for name, t in (("order", order), ("key", key), ("tok_slot", tok_slot)):
        check_index(name, t)
        if t.shape[0] != num:
            raise ValueError(f"{name} has {t.shape[0]} tokens, x has {num}")
    if slot_ranks is not None:
        check_index("slot_ranks", slot_ranks)
    if rank < 1 or a_pool.dim() != 3 or a_pool.shape[2] != dim_in or a_pool.shape[1] < rank \
            or n_pool.dim() != 3 or min(n_pool.shape[1:]) < rank:
        raise ValueError(f"a_pool {tuple(a_pool.shape)} / n_pool {tuple(n_pool.shape)} do not fit "
                         f"x {tuple(x.shape)} at R={rank}")
    cfg = get_config("grouped_shrink" + (".fp32" if x.dtype == torch.float32 else ""), rank,
                     device_config_name(x.device))
    blocks = triton.cdiv(num, cfg["BLOCK_T"])
    k_steps = triton.cdiv(dim_in, cfg["BLOCK_K"])
    # as many K ranges as fill ~PROGRAMS programs, but no more than keep each range's mix (an R × R
    # N per token, BT·R² reads) within the range's own x and A reads ((K / splits)·(BT + R))
    bt = cfg["BLOCK_T"]
    split = max(1, min(k_steps, cfg["PROGRAMS"] // max(blocks, 1), dim_in * (rank + bt) // (bt * rank * rank)))
    k_split = triton.cdiv(k_steps, split) * cfg["BLOCK_K"]
    split = triton.cdiv(dim_in, k_split)
    if num == 0:
        return out
    if split > 1:
        out.zero_()
    _grouped_shrink_kernel[(blocks, split)](
        x, a_pool, n_pool, order, key, tok_slot, order if slot_ranks is None else slot_ranks, out,
        num, dim_in, rank, k_split, x.stride(0), x.stride(1), *a_pool.stride(), *n_pool.stride(),
        out.stride(0), out.stride(1), HAS_RANKS=slot_ranks is not None, ATOMIC=split > 1,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"], BLOCK_I=cfg["BLOCK_I"],
        num_warps=cfg["num_warps"])
    return out
