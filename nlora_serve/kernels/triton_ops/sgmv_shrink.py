"""SGMV shrink (+ fused mix): z = A x over runs of tokens that share a slot (prefill form)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import dot_f32, load_tile, store_tile
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows


@triton.jit
def _sgmv_shrink_kernel(
        x_ptr, a_ptr, n_ptr, fam_ptr, start_ptr, len_ptr, slot_ptr, out_ptr,
        K, R,
        sx_t, sx_k, sa_f, sa_r, sa_k, sn_s, sn_i, sn_j, so_t, so_r,
        FUSE_MIX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    run, blk = tl.program_id(0), tl.program_id(1)
    length = tl.load(len_ptr + run)
    if blk * BLOCK_T < length:
        slot = tl.load(slot_ptr + run).to(tl.int64)
        fam = tl.load(fam_ptr + slot).to(tl.int64)
        local = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_t = tl.load(start_ptr + run) + local
        mask_t = local < length
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xt = load_tile(x_ptr, offs_t, offs_k, sx_t, sx_k, mask_t, mask_k)  # [BT, BK]
            at = load_tile(a_ptr + fam * sa_f, offs_k, offs_r, sa_k, sa_r, mask_k, mask_r)
            acc += dot_f32(xt, at)  # [BT, BR]
        if FUSE_MIX:
            # u = z Nᵀ: one N per run, so the mix is one more small dot, BLOCK_I output columns
            # at a time: a whole [R, R] fp32 tile of N next to acc spills registers at R ≥ 64.
            for i0 in tl.static_range(0, BLOCK_R, BLOCK_I):
                offs_i = i0 + tl.arange(0, BLOCK_I)
                mask_i = offs_i < R
                nt = load_tile(n_ptr + slot * sn_s, offs_r, offs_i, sn_j, sn_i, mask_r, mask_i)
                u = dot_f32(acc, nt.to(tl.float32))  # [BT, BI]
                store_tile(out_ptr, u, offs_t, offs_i, so_t, so_r, mask_t, mask_i)
        else:
            store_tile(out_ptr, acc, offs_t, offs_r, so_t, so_r, mask_t, mask_r)


def sgmv_shrink(x: torch.Tensor, a_pool: torch.Tensor, slot_families: torch.Tensor,
                seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor,
                max_seg_len: int, out: torch.Tensor, n_pool: torch.Tensor | None = None):
    """Shrink every run of same-slot tokens by its family's A, optionally mixing by its N.

    Semantics: out[t, :R] = N[s][:R, :R] · A[f][:R] · x[t] for t in run i, s = seg_slot[i],
    f = slot_families[s] (without n_pool: A[f][:R] · x[t]). R = out.shape[1]. Rows of tokens in
    no run are untouched. Accumulates in fp32.

    Args:
        x: [T, in] float (fp32/bf16/fp16), any strides.
        a_pool: [F, ≥R, in] same dtype as x, any strides.
        slot_families: [S] int32. seg_start, seg_len, seg_slot: [Ns] int32 (metadata runs).
        max_seg_len: longest run (tokens), sizes the grid.
        out: [T, R] float (any float dtype; fp32 keeps the intermediate exact), written.
        n_pool: [S, ≥R, ≥R] or None.

    Raises:
        TypeError / ValueError: dtype, device or shape mismatch.
    """
    rank = out.shape[1]
    check_float("x", x, a_pool.dtype)
    check_rows("out", out, x.shape[0])
    if a_pool.shape[2] != x.shape[1] or a_pool.shape[1] < rank:
        raise ValueError(f"a_pool {tuple(a_pool.shape)} does not fit x {tuple(x.shape)} at R={rank}")
    for name, t in (("slot_families", slot_families), ("seg_start", seg_start),
                    ("seg_len", seg_len), ("seg_slot", seg_slot)):
        check_index(name, t)
    if seg_start.numel() == 0 or max_seg_len == 0:
        return out
    n = a_pool if n_pool is None else n_pool  # placeholder pointer when unused
    cfg = get_config("sgmv_shrink", rank, device_config_name(out.device))
    grid = (seg_start.numel(), triton.cdiv(max_seg_len, cfg["BLOCK_T"]))
    _sgmv_shrink_kernel[grid](
        x, a_pool, n, slot_families, seg_start, seg_len, seg_slot, out, x.shape[1], rank,
        x.stride(0), x.stride(1), *a_pool.stride(), *n.stride()[:3], out.stride(0), out.stride(1),
        FUSE_MIX=n_pool is not None, BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=cfg["BLOCK_R"], BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"])
    return out
