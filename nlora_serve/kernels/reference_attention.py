"""Torch references of the paged attention ops, same signatures as the Triton launchers.

Written for clarity, not speed: one sequence at a time, keys gathered position by position
through the block table, softmax over an explicit score matrix, maths in the inputs' dtype (pass
float64 tensors for a float64 reference). Rows an op does not cover are never written.
"""

from __future__ import annotations

import torch


def _context(kv_layer: torch.Tensor, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [KVH, length, D] of positions 0..length-1 through one block table row."""
    block_size = kv_layer.shape[2]
    pos = torch.arange(length)
    blocks = table[pos // block_size].long()
    keys = kv_layer[0, blocks, pos % block_size]  # [length, KVH, D]
    values = kv_layer[1, blocks, pos % block_size]
    return keys.transpose(0, 1), values.transpose(0, 1)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
            scale: float) -> torch.Tensor:
    """q [n, H, D] over keys/values [KVH, L, D]; allowed [n, L] bool. Returns [n, H, D]."""
    group = q.shape[1] // keys.shape[0]
    keys = keys.repeat_interleave(group, 0)  # [H, L, D]: head h reads KV head h // G
    values = values.repeat_interleave(group, 0)
    scores = torch.einsum("nhd,hld->hnl", q, keys) * scale
    scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    return torch.einsum("hnl,hld->nhd", torch.softmax(scores, dim=-1), values)


def paged_decode_attention(q, kv_layer, block_tables, context_lens, scale, out, num_splits=1,
                           workspace=None):
    """Semantics as :func:`nlora_serve.kernels.triton_ops.paged_decode_attention.paged_decode_attention`:
    out[n, h] = softmax over p < context_lens[n] of scale · q[n, h]·K[p], applied to V[p].
    num_splits and workspace are accepted and ignored (no splitting here)."""
    for n in range(q.shape[0]):
        length = int(context_lens[n])
        if length == 0:
            continue
        keys, values = _context(kv_layer, block_tables[n], length)
        allowed = torch.ones(1, length, dtype=torch.bool)
        out[n] = _attend(q[n: n + 1], keys, values, allowed, scale)[0]
    return out


def paged_prefill_attention(q, kv_layer, query_starts, context_lens, block_tables, max_query_len,
                            scale, out):
    """Semantics as :func:`nlora_serve.kernels.triton_ops.paged_prefill_attention.paged_prefill_attention`:
    query i of sequence s sits at position c_s − q_s + i and attends to positions 0..that one.
    max_query_len is accepted and ignored."""
    for s in range(context_lens.shape[0]):
        start, end, length = int(query_starts[s]), int(query_starts[s + 1]), int(context_lens[s])
        if end == start:
            continue
        keys, values = _context(kv_layer, block_tables[s], length)
        positions = torch.arange(length - (end - start), length).unsqueeze(1)
        allowed = torch.arange(length).unsqueeze(0) <= positions  # [q, L]
        out[start:end] = _attend(q[start:end], keys, values, allowed, scale)
    return out
