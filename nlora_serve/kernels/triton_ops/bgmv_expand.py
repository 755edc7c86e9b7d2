"""BGMV expand-and-add: y += s · B u one token per program (decode form, fixed grid)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows


@triton.jit
def _bgmv_expand_kernel(
        u_ptr, b_ptr, fam_ptr, slot_ptr, scale_ptr, y_ptr, N, R,
        su_t, su_r, sb_f, sb_n, sb_r, sy_t, sy_n,
        HAS_FAMILY: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr):
    t, nblk = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # −1: the token is not on this path; its row is neither read nor written
        fam = 0
        if HAS_FAMILY:
            fam = tl.load(fam_ptr + t).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        u = tl.load(u_ptr + t * su_t + offs_r * su_r, mask=mask_r, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + fam * sb_f + offs_n[:, None] * sb_n + offs_r[None, :] * sb_r,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        # One token: a matrix-vector product as a multiply and a row sum (no 16-row tl.dot).
        acc = tl.sum(bt.to(tl.float32) * u[None, :], axis=1)  # [BLOCK_N]
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + slot)
        yv = tl.load(y_ptr + t * sy_t + offs_n * sy_n, mask=mask_n, other=0.0)
        tl.store(y_ptr + t * sy_t + offs_n * sy_n, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty),
                 mask=mask_n)


def bgmv_expand(u: torch.Tensor, b_pool: torch.Tensor, tok_family: torch.Tensor | None,
                tok_slot: torch.Tensor, y: torch.Tensor, slot_scalings: torch.Tensor | None = None):
    """Expand each token by its own B and add into y.

    Semantics: y[t] += slot_scalings[tok_slot[t]] · B[f][:, :R] · u[t] for every t with
    tok_slot[t] ≥ 0, f = tok_family[t] (0 when tok_family is None: the tied path's single
    B = W[:, :R]; scaling 1 when slot_scalings is None); R = u.shape[1]; other rows untouched;
    y modified in place. fp32 inside. The grid is (T, ⌈out / BLOCK_N⌉): it depends on shapes only,
    never on the step's slots, so a CUDA graph captured once replays for any slot assignment.

    Args:
        u: [T, R] float, any strides; must not overlap y.
        b_pool: [F, out, ≥R] same dtype as y, any strides.
        tok_family: [T] int32/int64 or None. tok_slot: [T] int32/int64, −1 = skip.
        y: [T, out] float, any strides (a column view of a fused output works).
        slot_scalings: [S] float32 or None.

    Raises:
        TypeError / ValueError: dtype or shape mismatch.
    """
    rank = u.shape[1]
    check_float("y", y, b_pool.dtype)
    check_rows("u", u, y.shape[0])
    check_index("tok_slot", tok_slot)
    if tok_slot.shape[0] != y.shape[0]:
        raise ValueError(f"tok_slot has {tok_slot.shape[0]} tokens, y has {y.shape[0]}")
    if tok_family is not None:
        check_index("tok_family", tok_family)
    if b_pool.dim() != 3 or b_pool.shape[1] != y.shape[1] or b_pool.shape[2] < rank:
        raise ValueError(f"b_pool {tuple(b_pool.shape)} does not fit y {tuple(y.shape)} at R={rank}")
    if slot_scalings is not None and slot_scalings.dtype != torch.float32:
        raise TypeError(f"slot_scalings must be float32, got {slot_scalings.dtype}")
    if y.shape[0] == 0:
        return y
    cfg = get_config("bgmv_expand", rank, device_config_name(y.device))
    grid = (y.shape[0], triton.cdiv(y.shape[1], cfg["BLOCK_N"]))
    _bgmv_expand_kernel[grid](
        u, b_pool, tok_slot if tok_family is None else tok_family, tok_slot,
        u if slot_scalings is None else slot_scalings, y, y.shape[1], rank, u.stride(0), u.stride(1),
        *b_pool.stride(), y.stride(0), y.stride(1), HAS_FAMILY=tok_family is not None,
        HAS_SCALE=slot_scalings is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
        num_warps=cfg["num_warps"])
    return y
