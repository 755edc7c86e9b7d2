"""BGMV shrink (+ fused mix): z = A x one token per program (decode form)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows


@triton.jit
def _bgmv_shrink_kernel(
        x_ptr, a_ptr, n_ptr, fam_ptr, slot_ptr, out_ptr, K, R,
        sx_t, sx_k, sa_f, sa_r, sa_k, sn_s, sn_i, sn_j, so_t, so_r,
        FUSE_MIX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    fam = tl.load(fam_ptr + t).to(tl.int64)
    if fam >= 0:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        # One token: a matrix-vector product, so a multiply and a row sum (no tl.dot, whose
        # M ≥ 16 would waste 15/16 of the work).
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xv = tl.load(x_ptr + t * sx_t + offs_k * sx_k, mask=mask_k, other=0.0)
            at = tl.load(a_ptr + fam * sa_f + offs_r[:, None] * sa_r + offs_k[None, :] * sa_k,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc += tl.sum(at.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        if FUSE_MIX:  # u = N z while z is still in registers
            slot = tl.load(slot_ptr + t).to(tl.int64)
            offs_j = tl.arange(0, BLOCK_R)
            nt = tl.load(n_ptr + slot * sn_s + offs_r[:, None] * sn_i + offs_j[None, :] * sn_j,
                         mask=mask_r[:, None] & (offs_j < R)[None, :], other=0.0)
            acc = tl.sum(nt.to(tl.float32) * acc[None, :], axis=1)
        tl.store(out_ptr + t * so_t + offs_r * so_r, acc.to(out_ptr.dtype.element_ty), mask=mask_r)


def bgmv_shrink(x: torch.Tensor, a_pool: torch.Tensor, tok_family: torch.Tensor,
                out: torch.Tensor, n_pool: torch.Tensor | None = None,
                tok_slot: torch.Tensor | None = None):
    """Shrink each token by its own family's A, optionally mixing by its slot's N.

    Semantics: out[t, :R] = N[tok_slot[t]][:R, :R] · A[tok_family[t]][:R] · x[t] for every t
    with tok_family[t] ≥ 0 (without n_pool: A x); other rows untouched. R = out.shape[1].
    Accumulates in fp32.

    Args:
        x: [T, in] float (fp32/bf16/fp16), any strides.
        a_pool: [F, ≥R, in] same dtype. tok_family: [T] int32, −1 = skip.
        out: [T, R] float, written. n_pool: [S, ≥R, ≥R] or None. tok_slot: [T] int32 (with n_pool).

    Raises:
        TypeError / ValueError: dtype or shape mismatch, n_pool without tok_slot.
    """
    rank = out.shape[1]
    check_float("x", x, a_pool.dtype)
    check_rows("out", out, x.shape[0])
    check_index("tok_family", tok_family)
    if a_pool.shape[2] != x.shape[1] or a_pool.shape[1] < rank:
        raise ValueError(f"a_pool {tuple(a_pool.shape)} does not fit x {tuple(x.shape)} at R={rank}")
    if n_pool is not None and tok_slot is None:
        raise ValueError("bgmv_shrink: n_pool needs tok_slot")
    if x.shape[0] == 0:
        return out
    n = a_pool if n_pool is None else n_pool  # placeholder pointer when unused
    slots = tok_family if tok_slot is None else tok_slot
    cfg = get_config("bgmv_shrink", rank, device_config_name(out.device))
    _bgmv_shrink_kernel[(x.shape[0],)](
        x, a_pool, n, tok_family, slots, out, x.shape[1], rank, x.stride(0), x.stride(1),
        *a_pool.stride(), *n.stride()[:3], out.stride(0), out.stride(1),
        FUSE_MIX=n_pool is not None, BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
        num_warps=cfg["num_warps"])
    return out
