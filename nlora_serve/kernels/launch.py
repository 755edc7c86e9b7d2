"""Argument checks shared by the Triton launchers (plain Python, run before every launch)."""

from __future__ import annotations

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTS = (torch.int32, torch.int64)


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise TypeError unless ``t`` has the compute dtype ``dtype`` (fp32, bf16 or fp16)."""
    if t.dtype not in _FLOATS or t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (one of fp32/bf16/fp16 for every operand), "
                        f"got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    """Raise TypeError/ValueError unless ``t`` is a contiguous 1-D int32/int64 index tensor."""
    if t.dtype not in _INTS:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")


def check_rows(name: str, t: torch.Tensor, num_tokens: int) -> None:
    """Raise ValueError unless ``t`` is 2-D with ``num_tokens`` rows."""
    if t.dim() != 2 or t.shape[0] != num_tokens:
        raise ValueError(f"{name} must be [{num_tokens}, ...], got {tuple(t.shape)}")
