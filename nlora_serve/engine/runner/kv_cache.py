"""The paged KV cache tensor: every layer's K and V in fixed-size blocks."""

from __future__ import annotations

import torch

from nlora_serve.models import ModelSpec


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def allocate_kv_cache(spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Zeroed cache ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` in ``dtype``.

    Index 0 of dim 1 is K, 1 is V. Zeroed rather than empty because attention reads whole blocks
    and masks the unused tail: masked keys get zero weight, but 0 * NaN from uninitialised memory
    would still poison the output.
    """
    shape = (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
