"""The compute dtype: ``--dtype auto|float32|bfloat16`` (DESIGN §5)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (there a bf16 GEMM ran 3x the fp32 rate)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """Map a ``--dtype`` value to a torch dtype.

    ``auto`` is bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, float32 elsewhere.

    Raises:
        ValueError: ``name`` is not one of auto, float32, bfloat16.
    """
    if name == "auto":
        if device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, float32, bfloat16; got {name!r}")
    return DTYPES[name]
