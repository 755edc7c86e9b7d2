"""The tied path in one launch per site: y += s · W[:, :R] · N · (W[:R] x), z recomputed from x.

The two-launch form (mix, then expand) copies z = y[:, :R] out of the base output before adding
into y (DESIGN §4: a launch that adds into y must never read y[:, :R], another program may have
added into those columns already). This form never reads z from y: every program recomputes
z = x · W[:R]ᵀ for its block of tokens (the base GEMM's own first R outputs without the bias, so
``tied_bias`` is not needed here), mixes each token by its slot's N, scales, and adds
u · W[:, :R]ᵀ into its block of output columns. The grid depends on T and out only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import dot_f32, load_tile, store_tile
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import check_float, check_index, check_rows


@triton.jit
def _tied_fused_kernel(
        x_ptr, wa_ptr, wb_ptr, n_ptr, slot_ptr, scale_ptr, y_ptr, T, K, N, R, N_TILES,
        sx_t, sx_k, swa_r, swa_k, swb_n, swb_r, sn_s, sn_i, sn_j, sy_t, sy_n,
        HAS_SCALE: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + offs_t, mask=offs_t < T, other=-1)
    valid = slots >= 0  # rows of −1 tokens (other paths, no adapter) are neither read nor written
    if tl.max(slots, axis=0) >= 0:  # a block without a tied token does nothing at all
        slot64 = tl.where(valid, slots, 0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        if HAS_Z:  # z given (x_ptr/sx_*: a buffer no launch of this step writes), K unused
            z = load_tile(x_ptr, offs_t, offs_r, sx_t, sx_k, valid, mask_r).to(tl.float32)
        else:
            z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):  # z = x · W[:R]ᵀ: the base output's first R columns
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                xt = load_tile(x_ptr, offs_t, offs_k, sx_t, sx_k, valid, mask_k)
                wa = load_tile(wa_ptr, offs_k, offs_r, swa_k, swa_r, mask_k, mask_r)
                z += dot_f32(xt, wa)
        scale = tl.full((BLOCK_T,), 1.0, tl.float32)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + slot64, mask=valid, other=0.0)
        # u = s · N z, one row of N at a time: u[:, i] = Σ_j N[slot, i, j] z[:, j]. Only [BLOCK_T,
        # BLOCK_R] tiles stay live (a [T, R, R] product tile spills at R ≥ 64); u is built once and
        # every column tile below reuses it.
        u = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        n_rows = n_ptr + slot64[:, None] * sn_s + offs_r[None, :] * sn_j
        mask_n_rows = valid[:, None] & mask_r[None, :]
        for i in range(0, R):
            n_i = tl.load(n_rows + i * sn_i, mask=mask_n_rows, other=0.0).to(tl.float32)
            u_i = tl.sum(n_i * z, axis=1)  # [BLOCK_T]
            u = tl.where(offs_r[None, :] == i, u_i[:, None], u)
        u = (u * scale[:, None]).to(wb_ptr.dtype.element_ty)
        for nt in range(N_TILES):  # a runtime count: one compile serves every (T, out)
            offs_n = (tl.program_id(1) * N_TILES + nt) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            wb = load_tile(wb_ptr, offs_r, offs_n, swb_r, swb_n, mask_r, mask_n)
            acc = dot_f32(u, wb)  # [BLOCK_T, BLOCK_N]: bf16/fp16 on tensor cores, fp32 "ieee"
            yv = load_tile(y_ptr, offs_t, offs_n, sy_t, sy_n, valid, mask_n)
            store_tile(y_ptr, yv.to(tl.float32) + acc, offs_t, offs_n, sy_t, sy_n, valid, mask_n)


def tied_fused(x: torch.Tensor, tied_a: torch.Tensor | None, tied_b: torch.Tensor, n_pool: torch.Tensor,
               tok_slot: torch.Tensor, y: torch.Tensor, rank: int,
               slot_scalings: torch.Tensor | None = None, overrides: dict | None = None,
               z: torch.Tensor | None = None) -> torch.Tensor:
    """Add each tied token's delta into y in one launch, z recomputed from x.

    Semantics: y[t] += s[slot] · W[:, :R] · N[slot][:R, :R] · (W[:R] · x[t]) for t with
    slot = tok_slot[t] ≥ 0 (s = 1 when slot_scalings is None); other rows untouched; y in place.
    fp32 accumulation; bf16/fp16 dots run on tensor cores (u is rounded to the dtype for the
    expand's dot), fp32 dots are "ieee". Grid (⌈T / BLOCK_T⌉, column programs), both from T and
    out only: a CUDA graph captured once replays for any slot assignment.

    Args:
        x: [T, in] the projection input. tied_a: [≥R, in] = W[:R'] (rows of the base weight at this
            module's offset), tied_b: [out, ≥R] = W[:, :R'], both any strides, x's dtype.
        n_pool: [S, ≥R, ≥R] x's dtype. tok_slot: [T] int32/int64, −1 = skip.
        y: [T, out] x's dtype, any strides (a column view of a fused output works).
        rank: R, 1…128. slot_scalings: [S] float32 or None.
        overrides: launch-config entries that replace the looked-up ones (BLOCK_T, BLOCK_K,
            BLOCK_N, PROGRAMS, num_warps; for benches and tuning; None on the serving path).
        z: [T, ≥R] x's dtype, any strides, or None: z = x · W[:R]ᵀ (no bias) already computed, e.g.
            as R extra output columns of the base GEMM (weight rows W[:R] appended); then no
            recompute, tied_a may be None, and z must not overlap y's columns.

    Raises:
        TypeError / ValueError: dtype or shape mismatch (named in the message).
    """
    if tied_a is None and z is None:
        raise ValueError("tied_a (to recompute z) or z is needed")
    for name, t in (("tied_a", tied_a), ("tied_b", tied_b), ("n_pool", n_pool), ("y", y), ("z", z)):
        if t is not None:
            check_float(name, t, x.dtype)
    check_rows("y", y, x.shape[0])
    check_index("tok_slot", tok_slot)
    if tok_slot.shape[0] != x.shape[0]:
        raise ValueError(f"tok_slot has {tok_slot.shape[0]} tokens, x has {x.shape[0]}")
    if not 1 <= rank <= 128:
        raise ValueError(f"rank must be in 1…128, got {rank}")
    if z is not None and (z.dim() != 2 or z.shape[0] != x.shape[0] or z.shape[1] < rank):
        raise ValueError(f"z {tuple(z.shape)} must be [T={x.shape[0]}, ≥{rank}]")
    if z is None and (tied_a.dim() != 2 or tied_a.shape[0] < rank or tied_a.shape[1] != x.shape[1]):
        raise ValueError(f"tied_a {tuple(tied_a.shape)} must be [≥{rank}, in={x.shape[1]}]")
    if tied_b.dim() != 2 or tied_b.shape[0] != y.shape[1] or tied_b.shape[1] < rank:
        raise ValueError(f"tied_b {tuple(tied_b.shape)} must be [out={y.shape[1]}, ≥{rank}]")
    if n_pool.dim() != 3 or n_pool.shape[1] < rank or n_pool.shape[2] < rank:
        raise ValueError(f"n_pool {tuple(n_pool.shape)} narrower than R={rank}")
    if slot_scalings is not None and slot_scalings.dtype != torch.float32:
        raise TypeError(f"slot_scalings must be float32, got {slot_scalings.dtype}")
    num, out = y.shape
    if num == 0 or out == 0:
        return y
    cfg = fused_config(num, out, rank, y.device, overrides, y.dtype)
    grid = (triton.cdiv(num, cfg["BLOCK_T"]), triton.cdiv(triton.cdiv(out, cfg["BLOCK_N"]), cfg["N_TILES"]))
    src, wa = (x, tied_a) if z is None else (z, tied_b)  # wa unread when z is given
    _tied_fused_kernel[grid](
        src, wa, tied_b, n_pool, tok_slot, x if slot_scalings is None else slot_scalings, y,
        num, x.shape[1], out, rank, cfg["N_TILES"], src.stride(0), src.stride(1), wa.stride(0), wa.stride(1),
        tied_b.stride(0), tied_b.stride(1), *n_pool.stride()[:3], y.stride(0), y.stride(1),
        HAS_SCALE=slot_scalings is not None, HAS_Z=z is not None, BLOCK_T=cfg["BLOCK_T"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
        num_warps=cfg["num_warps"])
    return y


def fused_config(num_tokens: int, out: int, rank: int, device: torch.device,
                 overrides: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The launch config at (T, out, R): the op's config plus N_TILES, column tiles per program.

    Each column program recomputes its token block's z (in·(BLOCK_T + R) elements read), so
    programs cover as many columns as keep about ``PROGRAMS`` programs in flight: at decode many
    column programs (occupancy), at prefill one per token block (z computed once, as a shrink).
    """
    # fp32's "ieee" dots are FMA loops: smaller tiles not to spill (config key "tied_fused.fp32")
    op = "tied_fused.fp32" if dtype == torch.float32 else "tied_fused"
    cfg = get_config(op, rank, device_config_name(device)) | (overrides or {})
    t_blocks = triton.cdiv(num_tokens, cfg["BLOCK_T"])
    n_blocks = triton.cdiv(out, cfg["BLOCK_N"])
    col_programs = max(1, min(n_blocks, triton.cdiv(cfg["PROGRAMS"], t_blocks)))
    cfg["N_TILES"] = triton.cdiv(n_blocks, col_programs)
    return cfg
