"""Grouped expand-and-add: y += s · B u over blocks of family-sorted tokens × blocks of columns.

The per-token BGMV expand (bgmv_expand.py) reads each token's B [out, R] once per token: at
64 decode tokens the gate/up B (0.9 MB at the Llama-3-8B shape) 64 times for one shared family.
Here a program takes BLOCK_T family-sorted positions (metadata.sort_group_tokens, built on the
device) and BLOCK_N output columns, finds the families present in its block from the sorted keys,
and for each loads that family's [R, BLOCK_N] tile of Bᵀ once and multiplies the family's rows of
u by it with tl.dot (tensor cores in bf16/fp16). B is read once per block of its tokens. The grid,
(⌈T / BLOCK_T⌉, ⌈out / BLOCK_N⌉), depends on shapes only: a CUDA graph captured once replays for
any tenant mix. Mixed ranks: each family's rank steps (BLOCK_R wide) stop at its block's largest
slot rank, so a rank-8 tenant next to a rank-64 one costs rank-8 reads and dots, not 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import dot_f32, load_tile, store_tile
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows
from nlora_serve.kernels.metadata import NO_GROUP_KEY

_NONE = tl.constexpr(NO_GROUP_KEY)


@triton.jit
def _grouped_expand_kernel(
        u_ptr, b_ptr, order_ptr, key_ptr, slot_ptr, rank_ptr, scale_ptr, y_ptr, T, N, R,
        su_t, su_r, sb_f, sb_n, sb_r, sy_t, sy_n,
        HAS_RANKS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr):
    pos = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    keys = tl.load(key_ptr + pos, mask=pos < T, other=_NONE)
    fam = tl.min(keys, axis=0)
    if fam < _NONE:  # a block past the group tokens does nothing at all
        valid = keys < _NONE  # other rows of y are neither read nor written
        tok = tl.load(order_ptr + pos, mask=valid, other=0).to(tl.int64)
        slots = tl.load(slot_ptr + tok, mask=valid, other=0).to(tl.int64)
        if HAS_RANKS:
            ranks = tl.minimum(tl.load(rank_ptr + slots, mask=valid, other=0), R)
        else:
            ranks = tl.where(valid, R, 0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        while fam < _NONE:  # the families of this block, ascending (the keys are sorted)
            rows = keys == fam
            rank = tl.max(tl.where(rows, ranks, 0), axis=0)
            for r0 in range(0, rank, BLOCK_R):  # one step up to rank 16 (BLOCK_R ≥ 16: tl.dot's K)
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < rank  # columns of B beyond the rank are never read
                u = load_tile(u_ptr, pos, offs_r, su_t, su_r, rows, mask_r)  # [BT, BR], 0 off the family
                bt = load_tile(b_ptr + fam.to(tl.int64) * sb_f, offs_r, offs_n, sb_r, sb_n, mask_r, mask_n)
                if bt.dtype != tl.float32:
                    u = u.to(bt.dtype)  # narrow B: a narrow u too, so the dot runs on tensor cores
                acc += dot_f32(u, bt)  # [BT, BN]
            fam = tl.min(tl.where(keys > fam, keys, _NONE), axis=0)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + slots, mask=valid, other=0.0)[:, None]
        # Each (t, n) belongs to exactly one program (a token has one sorted position): a plain
        # read-add-write, no atomics.
        yv = load_tile(y_ptr, tok, offs_n, sy_t, sy_n, valid, mask_n)
        store_tile(y_ptr, yv.to(tl.float32) + acc, tok, offs_n, sy_t, sy_n, valid, mask_n)


def grouped_expand(u: torch.Tensor, b_pool: torch.Tensor, order: torch.Tensor, key: torch.Tensor,
                   tok_slot: torch.Tensor, y: torch.Tensor, slot_scalings: torch.Tensor | None = None,
                   slot_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Expand every group token by its family's B and add into y; u in family-sorted row order.

    Semantics: for each sorted position i with key[i] = f ≠ NO_GROUP_KEY, token t = order[i],
    s = tok_slot[t]: y[t] += slot_scalings[s] · B[f][:, :r] · u[i, :r] with r the largest
    min(slot_ranks[s'], R) over the family's tokens in i's block (u[i, r(s):] = 0 by the shrink,
    so this equals r = the token's own rank); R = u.shape[1] (r = R when slot_ranks is None;
    scaling 1 when slot_scalings is None). Other rows of y untouched bit for bit; y in place.
    Accumulates in fp32; with a bf16/fp16 B, u is rounded to that dtype first (tensor-core dot).

    Args:
        u: [T, R] float (fp32 from :func:`~nlora_serve.kernels.triton_ops.grouped_shrink.grouped_shrink`),
            rows in sorted order, any strides; must not overlap y.
        b_pool: [F, out, ≥R], y's dtype, any strides.
        order, key: [T] int32 from :func:`~nlora_serve.kernels.metadata.sort_group_tokens`.
        tok_slot: [T] int32 (token order). y: [T, out] float, any strides (a column view of a fused
            output works). slot_scalings: [S] float32 or None. slot_ranks: [S] int32 or None.

    Raises:
        TypeError / ValueError: dtype or shape mismatch (named in the message).
    """
    rank = u.shape[1]
    num, out = y.shape
    check_float("y", y, b_pool.dtype)
    check_rows("u", u, num)
    for name, t in (("order", order), ("key", key), ("tok_slot", tok_slot)):
        check_index(name, t)
        if t.shape[0] != num:
            raise ValueError(f"{name} has {t.shape[0]} tokens, y has {num}")
    if slot_ranks is not None:
        check_index("slot_ranks", slot_ranks)
    if rank < 1 or b_pool.dim() != 3 or b_pool.shape[1] != out or b_pool.shape[2] < rank:
        raise ValueError(f"b_pool {tuple(b_pool.shape)} does not fit y {tuple(y.shape)} at R={rank}")
    if slot_scalings is not None and slot_scalings.dtype != torch.float32:
        raise TypeError(f"slot_scalings must be float32, got {slot_scalings.dtype}")
    if num == 0 or out == 0:
        return y
    cfg = get_config("grouped_expand" + (".fp32" if y.dtype == torch.float32 else ""), rank,
                     device_config_name(y.device))
    grid = (triton.cdiv(num, cfg["BLOCK_T"]), triton.cdiv(out, cfg["BLOCK_N"]))
    _grouped_expand_kernel[grid](
        u, b_pool, order, key, tok_slot, order if slot_ranks is None else slot_ranks,
        u if slot_scalings is None else slot_scalings, y, num, out, rank, u.stride(0), u.stride(1),
        *b_pool.stride(), y.stride(0), y.stride(1), HAS_RANKS=slot_ranks is not None,
        HAS_SCALE=slot_scalings is not None, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"])
    return y
