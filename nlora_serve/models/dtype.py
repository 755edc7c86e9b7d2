"""The compute dtype: ``--dtype``, in vLLM's spellings (DESIGN §5)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from nlora_serve.arg_types import DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16}
# vLLM's ModelDType (vllm/config/model.py): "float" is float32, "half" is float16. The engine (CPU
# and CUDA, the vLLM backend's folds too) computes in float32 or bfloat16 only, so the float16
# spellings are refused with the choices that run, not mapped to another dtype silently.
HALF = ("half", "float16")


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
        ValueError: ``half`` / ``float16`` (no float16 kernels here), or a name not in
            :data:`DTYPE_CHOICES`.
    """
    if name == "auto":
        if device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name in HALF:
        raise ValueError(f"--dtype {name}: this engine computes in float32 or bfloat16 only (it has no float16 "
                         "kernels); use --dtype bfloat16 (2 bytes a value, as float16) or float32")
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}")
    return DTYPES[name]
