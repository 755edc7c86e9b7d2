"""Paged decode attention: one query token per sequence over its block table, split over KV.

Flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023; vLLM's paged
attention v2): the context of each sequence is cut into at most ``num_splits`` equal runs of
whole ``BLOCK_N``-token tiles; one program per (sequence, KV head, split) keeps an online-softmax
max, sum and output for the query heads of its KV head, and a second kernel merges the splits.
The grid is (sequences, KV heads, ``num_splits``), fixed per engine (from max_model_len, see
:func:`decode_num_splits`), so it can be captured in a CUDA graph: how many splits a sequence
really uses is read from its context length on the device. A context held by one split is
written out by the first kernel directly; the merge kernel then leaves it alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import attend_paged_kv, jit_unaligned
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import attention_op_name, check_index, check_paged_attention

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 16
_SPLIT_TOKENS = 512  # context tokens per split at max_model_len


# context_lens[:n] is a view of one packed step buffer (engine/runner/step_inputs.py) at an offset that
# follows the step's token and sequence counts. Triton keys a compile on each pointer's 16-byte
# alignment, so eager (mixed) steps compiled both kernels again mid-serving for each alignment met;
# its loads are scalar, whose code the hint never changes. (The workspace's sections start aligned.)
_STEP_ALIGNED = ("ctx_ptr",)
_ALIGN = 4  # fp32 elements in 16 bytes: each workspace section starts on such a boundary


@jit_unaligned(*_STEP_ALIGNED)
def _paged_decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, out_ptr, acc_ptr, m_ptr, l_ptr,
        scale_log2, num_heads,
        sq_n, sq_h, sk_b, sk_t, sk_h, st_n, so_n, so_h,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr):
    seq, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    if start < ctx:
        offs_m = tl.arange(0, BLOCK_M)  # row i = query head kvh * G + i (GQA as in HF Llama)
        head = kvh * G + offs_m
        mask_m = offs_m < G
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(q_ptr + seq * sq_n + head[:, None] * sq_h + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [M, D]
        m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)  # finite: exp2(m_old - m_new) stays 0
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        end = tl.minimum(start + split_len, ctx)
        m_i, l_i, acc = attend_paged_kv(q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr + seq * st_n, start, end, 0, kvh,
                                        sk_b, sk_t, sk_h, scale_log2, offs_d, mask_d, False, BLOCK_SIZE, BLOCK_N)
        mask_md = mask_m[:, None] & mask_d[None, :]
        if split_len >= ctx:  # the whole context in this split: no merge needed
            o = acc / l_i[:, None]
            tl.store(out_ptr + seq * so_n + head[:, None] * so_h + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=mask_md)
        else:
            part = (seq * num_heads + head) * NUM_SPLITS + split  # [M] rows of the workspace
            tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_md)
            tl.store(m_ptr + part, m_i, mask=mask_m)
            tl.store(l_ptr + part, l_i, mask=mask_m)


@jit_unaligned(*_STEP_ALIGNED)
def _paged_decode_merge_kernel(
        ctx_ptr, out_ptr, acc_ptr, m_ptr, l_ptr, num_heads, so_n, so_h,
        HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N  # as the first kernel
    if split_len < ctx:
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < tl.cdiv(ctx, split_len)  # splits that ran; the rest hold stale data
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        part = (seq * num_heads + head) * NUM_SPLITS + offs_s
        m = tl.load(m_ptr + part, mask=mask_s, other=float("-inf"))
        l_s = tl.load(l_ptr + part, mask=mask_s, other=0.0)
        acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [S, D]
        w = tl.where(mask_s, tl.exp2(m - tl.max(m, 0)), 0.0)
        o = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l_s, 0)
        tl.store(out_ptr + seq * so_n + head * so_h + offs_d, o.to(out_ptr.dtype.element_ty),
                 mask=mask_d)


def decode_num_splits(max_model_len: int) -> int:
    """The split count for an engine: one split per 512 tokens of max_model_len, 1 to 16."""
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be ≥ 1, got {max_model_len}")
    return min(_MAX_SPLITS, triton.cdiv(max_model_len, _SPLIT_TOKENS))


def decode_workspace_numel(num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of the merge workspace: partial outputs [N, H, S, D], maxima and sums [N, H, S],
    each section 16-byte aligned (up to 2 · 3 padding elements)."""
    parts = num_seqs * num_heads * num_splits
    return _up(_up(parts * head_dim) + parts) + parts


def _up(elements: int) -> int:
    return -(-elements // _ALIGN) * _ALIGN


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, out: torch.Tensor,
                           num_splits: int = 1, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of N decode tokens over their sequences' paged KV cache, in place.

    Semantics: out[n, h] = Σ_p softmax_p(scale · q[n, h] · K[p]) · V[p] over positions
    p < context_lens[n], where K[p], V[p] = kv_layer[0 / 1, block_tables[n, p // BS], p % BS,
    h // G] and G = H / KVH (grouped-query attention as in HF Llama). Scores, softmax and sums
    in fp32; out cast to its dtype. Rows with context_lens[n] = 0 are left unwritten.

    Args:
        q: [N, H, D] fp32/bf16/fp16 queries (RoPE applied); any row and head strides, dims
            contiguous.
        kv_layer: [2, NB, BS, KVH, D] contiguous, q's dtype; 0 = keys, 1 = values (this step's
            already written).
        block_tables: [N, ≥B] int32/int64 contiguous rows (row stride free), B = blocks of the
            longest context; entries past a sequence's context are never read.
        context_lens: [N] int32/int64, each ≤ BS · B (not checked: a device tensor).
        scale: softmax scale, usually D ** -0.5.
        out: [N, H, D] q's dtype, dims contiguous; written.
        num_splits: the grid's splits per sequence (:func:`decode_num_splits`), 1 to 64.
        workspace: fp32 scratch of ≥ :func:`decode_workspace_numel` elements, contiguous
            (allocated here when None and num_splits > 1).

    Returns:
        out.

    Raises:
        TypeError: a dtype mismatch. ValueError: a shape, stride or num_splits it does not take.
    """
    n, num_heads, head_dim = q.shape
    _check(q, kv_layer, block_tables, context_lens, out, num_splits)
    num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    group = num_heads // num_kv_heads
    if n == 0:
        return out
    acc, m, l_s = _split_buffers(workspace, n, num_heads, head_dim, num_splits, q.device)
    op = attention_op_name("paged_decode_attention", q.dtype)
    cfg = get_config(op, head_dim, device_config_name(q.device))
    keys, values = kv_layer[0], kv_layer[1]
    _paged_decode_attention_kernel[(n, num_kv_heads, num_splits)](
        q, keys, values, block_tables, context_lens, out, acc, m, l_s, scale * _LOG2E, num_heads,
        q.stride(0), q.stride(1), *keys.stride()[:3], block_tables.stride(0), out.stride(0),
        out.stride(1), G=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_M=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_R"], num_warps=cfg["num_warps"])
    if num_splits > 1:
        _paged_decode_merge_kernel[(n, num_heads)](
            context_lens, out, acc, m, l_s, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_N=cfg["BLOCK_N"],
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=cfg["BLOCK_R"], num_warps=4)
    return out


def _split_buffers(workspace, n, num_heads, head_dim, num_splits, device):
    """Views (acc [N·H·S·D], max [N·H·S], sum [N·H·S]) of the fp32 workspace."""
    if num_splits == 1:  # one split always writes out directly: placeholders, never touched
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, dummy, dummy
    size = decode_workspace_numel(n, num_heads, head_dim, num_splits)
    if workspace is None:
        workspace = torch.empty(size, dtype=torch.float32, device=device)
    elif workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < size:
        raise ValueError(f"workspace must be contiguous fp32 with ≥ {size} elements, got "
                         f"{workspace.dtype} {tuple(workspace.shape)}")
    parts = n * num_heads * num_splits
    flat = workspace.view(-1)
    # sections on 16-byte boundaries: at N·H·S·(D + 1) the sums' alignment changed with N, and
    # Triton compiles a kernel again for each pointer alignment it meets
    m_at = _up(parts * head_dim)
    l_at = _up(m_at + parts)
    return flat[: parts * head_dim], flat[m_at: m_at + parts], flat[l_at: l_at + parts]


def _check(q, kv_layer, block_tables, context_lens, out, num_splits) -> None:
    check_paged_attention(q, kv_layer, block_tables, out, "N")
    check_index("context_lens", context_lens)
    n = q.shape[0]
    if block_tables.shape[0] != n or context_lens.shape[0] != n:
        raise ValueError(f"block_tables must be [{n}, B] with contiguous rows and context_lens "
                         f"[{n}], got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if not 1 <= num_splits <= 64:
        raise ValueError(f"num_splits must be 1 to 64, got {num_splits}")
