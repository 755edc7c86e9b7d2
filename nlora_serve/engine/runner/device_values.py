"""Small host lists onto the step's device without a stream sync.

``torch.tensor(values, device="cuda")`` copies from pageable memory with ``non_blocking=False``:
torch then synchronizes the stream (``memcpy_and_sync``), so the host waits for every kernel queued
before it, the whole forward of the step in flight. On the sampling path (temperatures, top-k /
top-p, row indices, logit_bias, penalties, min_tokens bans) that wait came after the forward was
launched and before the next step was scheduled, which is the overlap async scheduling exists
for. :func:`to_device` stages the values in pinned memory and copies them with
``non_blocking=True``: stream-ordered, no host wait; torch's caching host allocator keeps the
pinned block until the copy has run, so it is never rewritten under the copy.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, copied there without a host sync.

    Args:
        values: a (nested) list of Python numbers, as ``torch.tensor`` takes.
        device: the target; on the CPU (or any non-CUDA device) the tensor is built there directly.
        dtype: as ``torch.tensor``'s (None: inferred from ``values``).
    Returns:
        The tensor on ``device``; on CUDA its values are ready for kernels queued after this call.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, copied there without a host sync: :func:`to_device` for a tensor.

    ``tensor.to("cuda", non_blocking=True)`` from pageable memory still waits for the host: CUDA
    stages pageable memory through a driver buffer, copied before the call returns. Staged in pinned
    memory here (torch's caching host allocator keeps the block until the copy has run).

    Args:
        tensor: on the CPU, any dtype and shape (pinned already: copied as it is).
        device: the target; a non-CUDA device gets ``tensor.to(device)``.
    Returns:
        The tensor on ``device`` (``tensor`` itself when it is there already).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    staged = tensor if tensor.is_pinned() else tensor.pin_memory()
    return staged.to(device, non_blocking=True)
