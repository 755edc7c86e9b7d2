"""Paged prefill attention: causal attention of packed prefill chunks over their paged context.

Prefill and chunked prefill alike (vLLM's chunked-prefill paged attention; FlashAttention-2's
online softmax, Dao 2023): sequence s owns query tokens [query_starts[s], query_starts[s+1]),
whose keys and values (and those of every earlier chunk) are already in the KV cache, so every
key is read through the block table, including the chunk's own. One program per (sequence,
query tile, KV head) holds the query heads of its KV head together: its BLOCK_M rows are
BLOCK_M // G tokens × G heads (row r = token r // G, head r % G), so any GQA ratio, 3 included,
fills the tile with at most G - 1 idle rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlora_serve.kernels.triton_ops._triton_helpers import attend_paged_kv, jit_unaligned
from nlora_serve.kernels.triton_ops.config import device_config_name, get_config
from nlora_serve.kernels.triton_ops.launch import attention_op_name, check_index, check_paged_attention

_LOG2E = 1.4426950408889634


# query_starts[n:] and context_lens[n:] are views of one packed step buffer at offsets that follow
# the step's counts: keyed on their alignment, Triton compiled the kernel again mid-serving for
# each combination met (paged_decode_attention.py's _STEP_ALIGNED); their loads are scalar.
@jit_unaligned("start_ptr", "ctx_ptr")
def _paged_prefill_attention_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, start_ptr, ctx_ptr, out_ptr, scale_log2,
        sq_t, sq_h, sk_b, sk_t, sk_h, st_s, so_t, so_h,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seq, tile, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BLOCK_Q: tl.constexpr = BLOCK_M // G  # query tokens per program
    q_start = tl.load(start_ptr + seq)
    q_len = tl.load(start_ptr + seq + 1) - q_start
    if tile * BLOCK_Q < q_len:
        ctx = tl.load(ctx_ptr + seq)
        offs_m = tl.arange(0, BLOCK_M)
        tok = tile * BLOCK_Q + offs_m // G
        head = kvh * G + offs_m % G
        mask_m = (offs_m < BLOCK_Q * G) & (tok < q_len)
        pos = ctx - q_len + tok  # each query's position in its sequence: it sees keys 0..pos
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        mask_md = mask_m[:, None] & mask_d[None, :]
        q_rows = (q_start + tok).to(tl.int64) * sq_t + head * sq_h
        q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=mask_md, other=0.0)  # [M, D]
        m_i = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)  # finite: exp2(m_old - m_new) stays 0
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        hi = ctx - q_len + tl.minimum(q_len, (tile + 1) * BLOCK_Q)  # past the tile's last query
        m_i, l_i, acc = attend_paged_kv(q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr + seq * st_s, 0, hi, pos, kvh,
                                        sk_b, sk_t, sk_h, scale_log2, offs_d, mask_d, True, BLOCK_SIZE, BLOCK_N)
        o = acc / l_i[:, None]
        out_rows = (q_start + tok).to(tl.int64) * so_t + head * so_h
        tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=mask_md)


def paged_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, query_starts: torch.Tensor,
                            context_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of S packed query chunks over their sequences' paged KV cache, in place.

    Semantics: for sequence s with q_s = query_starts[s+1] − query_starts[s] and
    c_s = context_lens[s], token t = query_starts[s] + i (0 ≤ i < q_s) sits at position
    p_t = c_s − q_s + i and out[t, h] = Σ_{p ≤ p_t} softmax_p(scale · q[t, h] · K[p]) · V[p],
    K[p], V[p] = kv_layer[0 / 1, block_tables[s, p // BS], p % BS, h // G], G = H / KVH.
    A plain prefill is q_s = c_s; a chunk after a cached prefix has q_s < c_s. Scores, softmax
    and sums in fp32; out cast to its dtype. Rows of q outside every chunk are left unwritten.

    Args:
        q: [T, H, D] fp32/bf16/fp16 queries (RoPE applied); any row and head strides, dims
            contiguous. query_starts index its rows, so it may hold other tokens (decodes) too.
        kv_layer: [2, NB, BS, KVH, D] contiguous, q's dtype, with the chunks' own K/V written.
        query_starts: [S + 1] int32/int64 contiguous, non-decreasing, ≤ T.
        context_lens: [S] int32/int64 contiguous, c_s ≥ q_s, c_s ≤ BS · B (not checked: device).
        block_tables: [S, ≥B] int32/int64, rows contiguous; entries past a context never read.
        max_query_len: max_s q_s (host int: sizes the grid; 0 launches nothing).
        scale: softmax scale, usually D ** -0.5.
        out: [T, H, D] q's dtype, dims contiguous; rows of the chunks written.

    Returns:
        out.

    Raises:
        TypeError: a dtype mismatch. ValueError: a shape or stride it does not take.
    """
    _check(q, kv_layer, query_starts, context_lens, block_tables, out)
    num_seqs, (_, num_heads, head_dim) = context_lens.shape[0], q.shape
    num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    group = num_heads // num_kv_heads
    if num_seqs == 0 or max_query_len <= 0:
        return out
    op = attention_op_name("paged_prefill_attention", q.dtype)
    cfg = get_config(op, head_dim, device_config_name(q.device))
    block_m = max(cfg["BLOCK_M"], triton.next_power_of_2(group))
    keys, values = kv_layer[0], kv_layer[1]
    grid = (num_seqs, triton.cdiv(max_query_len, block_m // group), num_kv_heads)
    _paged_prefill_attention_kernel[grid](
        q, keys, values, block_tables, query_starts, context_lens, out, scale * _LOG2E,
        q.stride(0), q.stride(1), *keys.stride()[:3], block_tables.stride(0), out.stride(0),
        out.stride(1), G=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_R"], num_warps=cfg["num_warps"])
    return out


def _check(q, kv_layer, query_starts, context_lens, block_tables, out) -> None:
    check_paged_attention(q, kv_layer, block_tables, out, "T")
    check_index("query_starts", query_starts)
    check_index("context_lens", context_lens)
    num_seqs = context_lens.shape[0]
    if query_starts.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"query_starts must be [{num_seqs + 1}] and block_tables [{num_seqs}, B] with "
                         f"contiguous rows, got {tuple(query_starts.shape)} and {tuple(block_tables.shape)}")
