"""The compute dtype: ``--dtype``, in vLLM's spellings (DESIGN §5)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from nlora_serve.arg_types import check_dtype

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16}


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

    ``auto`` is bfloat16 on CUDA and on CPUs with AMX / AVX512-BF16, float32 elsewhere (vLLM's
    ``auto`` follows the model's config dtype instead, float16 for a float32 model); ``float`` is
    float32, as in vLLM.

    Raises:
        ValueError: as :func:`nlora_serve.arg_types.check_dtype` (``half`` / ``float16``, or a name
            not in its choices).
    """
    check_dtype(name)
    if name == "auto":
        if device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]
