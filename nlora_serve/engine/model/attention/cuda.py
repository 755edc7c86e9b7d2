"""Attention over the paged KV cache for a packed ragged batch with our Triton kernels (CUDA).

Same contract as :func:`nlora_serve.engine.model.attention.cpu.paged_attention`: this step's keys and
values are written into the cache first, then the first ``info.num_decodes`` tokens run the
split-KV decode kernel and the prefill chunks after them the paged prefill kernel, both reading
every key through the block tables (DESIGN §5). Every tensor read comes from :class:`BatchInfo`
(on q's device); the only host values are ``num_decodes``, ``max_query_len`` and
``decode_splits``. Runs on CPU tensors too under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch

from nlora_serve.engine.model.attention.cpu import write_kv
from nlora_serve.engine.model.batch_info import BatchInfo
from nlora_serve.kernels.triton_ops.paged_decode_attention import paged_decode_attention
from nlora_serve.kernels.triton_ops.paged_prefill_attention import paged_prefill_attention


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                    info: BatchInfo, scale: float, native: object = None) -> torch.Tensor:
    """Causal attention of every packed token over its sequence's cached context.

    Args:
        q: [T, H, D] queries (RoPE applied; rows may be strided, dims contiguous).
            k, v: [T, KVH, D] this step's keys and values.
        kv_layer: [2, NB, BS, KVH, D] this layer's cache, contiguous; k and v are written first.
        info: the step's layout (``block_tables``, ``context_lens``, ``query_starts``,
            ``slot_mapping`` on q's device). scale: softmax scale, usually D ** -0.5.
        native: accepted so the layer can call either device's attention alike; unused here.
    Returns:
        [T, H * D] attention output, same dtype as ``q``.
    Raises:
        TypeError / ValueError: from the kernels' launchers on a dtype or layout they refuse.
    """
    write_kv(kv_layer, k, v, info.slot_mapping)
    return attend_cached(q, kv_layer, info, scale, torch.empty(q.shape, dtype=q.dtype, device=q.device))


def attend_cached(q: torch.Tensor, kv_layer: torch.Tensor, info: BatchInfo, scale: float,
                  out: torch.Tensor) -> torch.Tensor:
    """The attention of :func:`paged_attention` once this step's K/V are in ``kv_layer`` (the
    piecewise graphs write them inside a captured piece): decode kernel on the first
    ``info.num_decodes`` tokens, prefill kernel on the chunks after them. ``out`` [T, H, D] (q's
    dtype) receives every row; returns it as [T, H * D]."""
    n = info.num_decodes
    if n:
        paged_decode_attention(q[:n], kv_layer, info.block_tables[:n], info.context_lens[:n], scale,
                               out[:n], info.decode_splits)
    if info.max_query_len:
        # query_starts index the whole packed q, so the chunks need no re-basing
        paged_prefill_attention(q, kv_layer, info.query_starts[n:], info.context_lens[n:],
                                info.block_tables[n:], info.max_query_len, scale, out)
    return out.view(q.shape[0], -1)
