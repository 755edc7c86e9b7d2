"""SGMV expand-and-add: y += s · B u over runs of tokens that share one B."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import dot_f32, load_tile
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows


@triton.jit
def _sgmv_expand_kernel(
        u_ptr, b_ptr, start_ptr, len_ptr, fam_ptr, slot_ptr, scale_ptr, y_ptr, N, R,
        su_t, su_r, sb_f, sb_n, sb_r, sy_t, sy_n,
        HAS_FAMILY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr):
    run, blk, nblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(len_ptr + run)
    if blk * BLOCK_T < length:
        fam = 0
        if HAS_FAMILY:
            fam = tl.load(fam_ptr + run).to(tl.int64)
        local = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_t = tl.load(start_ptr + run) + local
        mask_t = local < length
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        u = load_tile(u_ptr, offs_t, offs_r, su_t, su_r, mask_t, mask_r)  # [BT, BR]
        bt = load_tile(b_ptr + fam * sb_f, offs_r, offs_n, sb_r, sb_n, mask_r, mask_n)
        if bt.dtype != tl.float32:
            # Narrow B (bf16/fp16): u narrowed too, so the dot runs on tensor cores (fp32
            # accumulate), as the CPU path's expand does; an fp32 u would force FMA units.
            u = u.to(bt.dtype)
        acc = dot_f32(u, bt)  # [BT, BN]
        slots = tl.load(slot_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        acc *= tl.load(scale_ptr + slots, mask=mask_t, other=0.0)[:, None]
        # Each (t, n) belongs to exactly one program: a plain read-add-write, no atomics.
        y_offs = offs_t[:, None] * sy_t + offs_n[None, :] * sy_n
        mask = mask_t[:, None] & mask_n[None, :]
        yv = tl.load(y_ptr + y_offs, mask=mask, other=0.0)
        tl.store(y_ptr + y_offs, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def sgmv_expand(u: torch.Tensor, b_pool: torch.Tensor, seg_start: torch.Tensor,
                seg_len: torch.Tensor, seg_family: torch.Tensor | None, max_seg_len: int,
                tok_slot: torch.Tensor, slot_scalings: torch.Tensor, y: torch.Tensor):
    """Expand every run of tokens by its B and add into y with each token's scaling.

    Semantics: y[t] += slot_scalings[tok_slot[t]] · B[f][:, :R] · u[t] for t in run i,
    f = seg_family[i] (0 when seg_family is None: the tied path's single B = W[:, :R]);
    R = u.shape[1]; rows of tokens in no run are untouched; y modified in place. Accumulates
    in fp32; with a bf16/fp16 b_pool, u is rounded to that dtype first (tensor-core dot).

    Args:
        u: [T, R] float (fp32 keeps fp32 runs exact), any strides; must not overlap y.
        b_pool: [F, out, ≥R] same dtype as y, any strides.
        seg_start, seg_len: [Ns] int32; seg_family: [Ns] int32 or None. max_seg_len: tokens.
        tok_slot: [T] int32 (valid for tokens in runs). slot_scalings: [S] float32.
        y: [T, out] float, any strides (a column view of a fused output works).

    Raises:
        TypeError / ValueError: dtype or shape mismatch.
    """
    rank = u.shape[1]
    check_float("y", y, b_pool.dtype)
    check_rows("u", u, y.shape[0])
    for name, t in (("seg_start", seg_start), ("seg_len", seg_len), ("tok_slot", tok_slot)):
        check_index(name, t)
    if b_pool.shape[1] != y.shape[1] or b_pool.shape[2] < rank:
        raise ValueError(f"b_pool {tuple(b_pool.shape)} does not fit y {tuple(y.shape)} at R={rank}")
    if slot_scalings.dtype != torch.float32:
        raise TypeError(f"slot_scalings must be float32, got {slot_scalings.dtype}")
    if seg_start.numel() == 0 or max_seg_len == 0:
        return y
    cfg = get_config("sgmv_expand", rank, device_config_name(y.device))
    grid = (seg_start.numel(), triton.cdiv(max_seg_len, cfg["BLOCK_T"]),
            triton.cdiv(y.shape[1], cfg["BLOCK_N"]))
    _sgmv_expand_kernel[grid](
        u, b_pool, seg_start, seg_len, seg_start if seg_family is None else seg_family, tok_slot,
        slot_scalings, y, y.shape[1], rank, u.stride(0), u.stride(1), *b_pool.stride(),
        y.stride(0), y.stride(1), HAS_FAMILY=seg_family is not None, BLOCK_T=cfg["BLOCK_T"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], num_warps=cfg["num_warps"])
    return y
