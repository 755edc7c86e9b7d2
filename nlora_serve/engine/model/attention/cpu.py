"""Attention over the paged KV cache for a packed ragged batch (CPU, torch SDPA).

Decode tokens of all sequences run as one batched SDPA call per layer: their blocks are gathered
to ``[N, L, kv_heads, head_dim]`` (whole blocks, so the copy is a few large memcpys) and keys past
each context length are masked. The query heads of one KV head are folded into the query-length
axis (``[N, kv_heads, group, head_dim]``), so grouped-query attention needs no K/V repeat.
Prefill chunks run one SDPA call each (a step holds few of them). Where the native CPU ops are
loaded (``kernels/cpu/native.py``), neither gathers: decode tokens and prefill chunks (flash attention's
online softmax, cpu/paged_prefill.c) read each cached row in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlora_serve.kernels.cpu.native import NativeOps
from nlora_serve.engine.model.batch_info import BatchInfo, PrefillChunk


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values. ``kv_layer`` [2, NB, BS, KVH, D]; ``k``, ``v`` [T, KVH, D]."""
    num_kv_heads, head_dim = k.shape[1:]
    kv_layer[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_layer[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                    info: BatchInfo, scale: float, native: NativeOps | None = None) -> torch.Tensor:
    """Causal attention of every packed token over its sequence's cached context.

    Args:
        q: [T, H, D] queries (RoPE applied). k, v: [T, KVH, D] this step's keys and values.
        kv_layer: [2, NB, BS, KVH, D] this layer's cache; k and v are written into it first.
        info: the step's layout. scale: softmax scale, usually D ** -0.5.
        native: the native CPU ops; when given, decode tokens run through its paged decode and
            prefill chunks through its paged prefill.
    Returns:
        [T, H * D] attention output, same dtype as ``q``.
    """
    if native is not None:
        native.attention.write_kv(kv_layer, k, v, info.slot_mapping)
    else:
        write_kv(kv_layer, k, v, info.slot_mapping)
    out = torch.empty_like(q)
    n = info.num_decodes
    if n and native is not None:
        native.attention.decode(q[:n], kv_layer, info.decode_block_tables, info.context_lens[:n], scale, out[:n],
                                torch.get_num_threads())
    elif n:
        out[:n] = _decode(q[:n], kv_layer, info, scale)
    if info.prefills and native is not None:  # every chunk in one call, straight over the cache
        native.attention.prefill(q, kv_layer, info.block_tables[n:], info.query_starts[n:], info.context_lens[n:],
                                 scale, out, torch.get_num_threads())
        return out.view(q.shape[0], -1)
    for chunk in info.prefills:
        out[chunk.start:chunk.end] = _prefill(q, k, v, kv_layer, chunk, scale)
    return out.view(q.shape[0], -1)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows, L, KVH, D]`` keys or values of the given blocks (``block_ids`` [rows * B])."""
    blocks = cache.index_select(0, block_ids)
    return blocks.view(rows, -1, *cache.shape[2:])


def _decode(q: torch.Tensor, kv_layer: torch.Tensor, info: BatchInfo, scale: float) -> torch.Tensor:
    n, num_heads, head_dim = q.shape
    num_kv_heads = kv_layer.shape[3]
    ids = info.decode_block_tables.view(-1)
    keys = _gather(kv_layer[0], ids, n).transpose(1, 2)  # [N, KVH, L, D]
    values = _gather(kv_layer[1], ids, n).transpose(1, 2)
    folded = q.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [N, KVH, G, D]
    o = F.scaled_dot_product_attention(folded, keys, values, attn_mask=info.decode_mask, scale=scale)
    return o.reshape(n, num_heads, head_dim)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
             chunk: PrefillChunk, scale: float) -> torch.Tensor:
    qc = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
    if chunk.mask is None:  # no cached prefix: the chunk's own K/V are the whole context
        keys = k[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
        values = v[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
    else:
        c = chunk.context_len
        keys = _gather(kv_layer[0], chunk.block_ids, 1)[:, :c].transpose(1, 2)  # [1, KVH, c, D]
        values = _gather(kv_layer[1], chunk.block_ids, 1)[:, :c].transpose(1, 2)
    o = F.scaled_dot_product_attention(qc, keys, values, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                                       scale=scale, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)  # [q, H, D]
