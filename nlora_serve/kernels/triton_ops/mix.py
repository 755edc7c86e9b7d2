"""Mix: u = N (z − bias) per token, N gathered by slot (the tied path's only per-token work)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import load_tile, store_tile
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows


@triton.jit
def _mix_kernel(
        z_ptr, n_ptr, slot_ptr, bias_ptr, out_ptr, T, R,
        sz_t, sz_j, sn_s, sn_i, sn_j, so_t, so_r,
        HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_I: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + offs_t, mask=offs_t < T, other=-1)
    valid = slots >= 0  # rows of −1 tokens are neither read nor written
    slot64 = tl.where(valid, slots, 0).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_R)
    mask_j = offs_j < R
    z = load_tile(z_ptr, offs_t, offs_j, sz_t, sz_j, valid, mask_j).to(tl.float32)
    if HAS_BIAS:
        z -= tl.load(bias_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    # r is at most 128: a [BLOCK_T, BLOCK_I, BLOCK_R] product tile per output chunk beats
    # padding every token to a 16-row tl.dot.
    for i0 in tl.static_range(0, BLOCK_R, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < R
        n = tl.load(n_ptr + slot64[:, None, None] * sn_s + offs_i[None, :, None] * sn_i
                    + offs_j[None, None, :] * sn_j,
                    mask=valid[:, None, None] & mask_i[None, :, None] & mask_j[None, None, :],
                    other=0.0)
        u = tl.sum(n.to(tl.float32) * z[:, None, :], axis=2)  # [BLOCK_T, BLOCK_I]
        store_tile(out_ptr, u, offs_t, offs_i, so_t, so_r, valid, mask_i)


def mix(z: torch.Tensor, n_pool: torch.Tensor, tok_slot: torch.Tensor, out: torch.Tensor,
        bias: torch.Tensor | None = None):
    """Multiply each token's z by its slot's N.

    Semantics: out[t, :R] = N[tok_slot[t]][:R, :R] · (z[t, :R] − bias[:R]) for t with
    tok_slot[t] ≥ 0; other rows untouched. R = out.shape[1]. fp32 inside.

    Args:
        z: [T, ≥R] float, any strides (the tied path passes y itself: y[:, :R] of the base
            output, read here before anything adds into y).
        n_pool: [S, ≥R, ≥R] same dtype as z, any strides. tok_slot: [T] int32, −1 = skip.
        out: [T, R] float, written; must not overlap z.
        bias: [≥R] same dtype or None (base layers with a bias: z = y − b).

    Raises:
        TypeError / ValueError: dtype or shape mismatch.
    """
    rank = out.shape[1]
    check_float("z", z, n_pool.dtype)
    check_rows("out", out, z.shape[0])
    check_index("tok_slot", tok_slot)
    if z.shape[1] < rank or n_pool.shape[1] < rank or n_pool.shape[2] < rank:
        raise ValueError(f"z {tuple(z.shape)} / n_pool {tuple(n_pool.shape)} narrower than R={rank}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] < rank):
        raise ValueError(f"bias must be [≥{rank}], got {tuple(bias.shape)}")
    num = z.shape[0]
    if num == 0:
        return out
    cfg = get_config("mix", rank, device_config_name(out.device))
    grid = (triton.cdiv(num, cfg["BLOCK_T"]),)
    _mix_kernel[grid](
        z, n_pool, tok_slot, z if bias is None else bias, out, num, rank, z.stride(0), z.stride(1),
        *n_pool.stride()[:3], out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_R=cfg["BLOCK_R"], BLOCK_I=cfg["BLOCK_I"],
        num_warps=cfg["num_warps"])
    return out
