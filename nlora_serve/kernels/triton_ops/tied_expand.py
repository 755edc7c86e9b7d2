"""Tiled tied expand-and-add: y += s · u · W[:, :R]ᵀ, a block of tokens × a block of columns per program.

Every tied tenant shares one expand matrix, W[:, :R]. The per-token BGMV expand
(bgmv_expand.py) runs one program per token, so each token re-reads W[:, :R] (0.9 MB for one
gate/up module at the Llama-3-8B shape, 64 times at 64 tokens). Here a program loads its
[BLOCK_R, BLOCK_N] tile of W[:, :R]ᵀ once and multiplies a [BLOCK_T, BLOCK_R] tile of u by it
with tl.dot (tensor cores in bf16/fp16), so W is read once per token block. Rows of tokens with
slot −1 are masked on load and store. The grid, (⌈T / BLOCK_T⌉, ⌈out / BLOCK_N⌉), depends on
shapes only: a CUDA graph captured once replays for any slot assignment, nothing is read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import dot_f32, load_tile, store_tile
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows


@triton.jit
def _tied_expand_kernel(
        u_ptr, b_ptr, slot_ptr, scale_ptr, y_ptr, T, N, R,
        su_t, su_r, sb_n, sb_r, sy_t, sy_n,
        HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, R_STEPS: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + offs_t, mask=offs_t < T, other=-1)
    valid = slots >= 0  # −1: the token is not on this path; its row is neither read nor written
    if tl.max(slots, axis=0) >= 0:  # a block without a tied token does nothing at all
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        # one step up to rank 128 (BLOCK_R is capped there); unrolled: a runtime loop would be
        # software-pipelined through shared memory for what is a single step at every served rank
        for r0 in tl.static_range(0, R_STEPS * BLOCK_R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R  # BLOCK_R ≥ 16 (tl.dot's K); columns of W beyond R are never read
            u = load_tile(u_ptr, offs_t, offs_r, su_t, su_r, valid, mask_r)  # [BT, BR]
            bt = load_tile(b_ptr, offs_r, offs_n, sb_r, sb_n, mask_r, mask_n)  # [BR, BN] of W[:, :R]ᵀ
            if bt.dtype != tl.float32:
                u = u.to(bt.dtype)  # narrow W: a narrow u too, so the dot runs on tensor cores
            acc += dot_f32(u, bt)  # fp32 accumulate ("ieee" when fp32)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + tl.where(valid, slots, 0).to(tl.int64), mask=valid, other=0.0)[:, None]
        # Each (t, n) belongs to exactly one program: a plain read-add-write, no atomics.
        yv = load_tile(y_ptr, offs_t, offs_n, sy_t, sy_n, valid, mask_n)
        store_tile(y_ptr, yv.to(tl.float32) + acc, offs_t, offs_n, sy_t, sy_n, valid, mask_n)


def tied_expand(u: torch.Tensor, tied_b: torch.Tensor, tok_slot: torch.Tensor, y: torch.Tensor,
                slot_scalings: torch.Tensor | None = None) -> torch.Tensor:
    """Expand every tied token by the shared W[:, :R] and add into y, one W tile per token block.

    Semantics: y[t] += slot_scalings[tok_slot[t]] · W[:, :R] · u[t] for every t with
    tok_slot[t] ≥ 0 (scaling 1 when slot_scalings is None); R = u.shape[1]; other rows untouched
    bit for bit; y modified in place. The same as ``bgmv_expand(u, tied_b[None], None, tok_slot, y,
    slot_scalings)``. Accumulates in fp32; with a bf16/fp16 W, u is rounded to that dtype first
    (tensor-core dot, as sgmv_expand and tied_fused do); fp32 dots are "ieee".

    Args:
        u: [T, R] float (fp32 from mix), any strides; must not overlap y.
        tied_b: [out, ≥R] = W[:, :R'] (the base weight's first columns at this module's rows),
            y's dtype, any strides.
        tok_slot: [T] int32/int64, −1 = skip.
        y: [T, out] float, any strides (a column view of a fused output works).
        slot_scalings: [S] float32 or None.

    Raises:
        TypeError / ValueError: dtype or shape mismatch (named in the message).
    """
    rank = u.shape[1]
    check_float("y", y, tied_b.dtype)
    check_rows("u", u, y.shape[0])
    check_index("tok_slot", tok_slot)
    if tok_slot.shape[0] != y.shape[0]:
        raise ValueError(f"tok_slot has {tok_slot.shape[0]} tokens, y has {y.shape[0]}")
    if rank < 1:
        raise ValueError(f"u must have at least one rank column, got {tuple(u.shape)}")
    if tied_b.dim() != 2 or tied_b.shape[0] != y.shape[1] or tied_b.shape[1] < rank:
        raise ValueError(f"tied_b {tuple(tied_b.shape)} must be [out={y.shape[1]}, ≥{rank}]")
    if slot_scalings is not None and slot_scalings.dtype != torch.float32:
        raise TypeError(f"slot_scalings must be float32, got {slot_scalings.dtype}")
    num, out = y.shape
    if num == 0 or out == 0:
        return y
    cfg = tiled_config(rank, y.device, y.dtype)
    grid = (triton.cdiv(num, cfg["BLOCK_T"]), triton.cdiv(out, cfg["BLOCK_N"]))
    _tied_expand_kernel[grid](
        u, tied_b, tok_slot, u if slot_scalings is None else slot_scalings, y, num, out, rank,
        u.stride(0), u.stride(1), tied_b.stride(0), tied_b.stride(1), y.stride(0), y.stride(1),
        HAS_SCALE=slot_scalings is not None, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=cfg["BLOCK_R"], R_STEPS=triton.cdiv(rank, cfg["BLOCK_R"]), num_warps=cfg["num_warps"])
    return y


def tiled_config(rank: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The op's launch config at rank width ``rank``: fp32 ("ieee" dots are FMA loops) has its own
    key, ``tied_expand.fp32``, so the two dtypes can be tuned apart."""
    op = "tied_expand.fp32" if dtype == torch.float32 else "tied_expand"
    return get_config(op, rank, device_config_name(device))
