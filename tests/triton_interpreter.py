"""The Triton interpreter's bf16 arithmetic, made a GPU's for the tests (tests/kernels, tests/engine).

Triton 3.9's interpreter stores bf16 as raw uint16 bits (numpy has no bf16), and gets two things
wrong with them:

- its ``create_dot`` converts only fp8 operands, so a bf16 ``tl.dot`` multiplies the bit patterns
  as integers: a correct bf16 kernel returns garbage on the CPU (the engine's bf16 logits ~100%
  off), where a GPU widens the operands exactly to fp32;
- its fp32 -> bf16 cast (``x.to(tl.bfloat16)``, and a store of fp32 values through a bf16
  pointer) drops the low 16 bits: it rounds toward zero, where a GPU rounds to nearest even. Every
  bf16 value a kernel writes is then up to 1 ulp off, all one way: a LoRA projection's output
  after the adapter kernels lands 6.1e-3 (relative) from the exact sum instead of the 2.3e-3 of
  its design's two roundings, the engine's bf16 K/V of adapted tokens ~1.5x further from fp32
  (tests/engine/test_device_path_bf16.py's BF16_KV_TOL tells the two apart).

:func:`patch_interpreter_bf16` fixes both. A test-only fix: the engine never
runs the interpreter when serving. Importing this module imports Triton, so the modules that need
it import it (the kernel tests' conftest, the engine's bf16 device-path tests), not tests/conftest.py.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as _interp

_create_dot = _interp.InterpreterBuilder.create_dot
_cast_impl = _interp.InterpreterBuilder.cast_impl


def _widen_bf16(handle):
    """The interpreter stores bf16 as raw uint16 bits; widen exactly to fp32 (as a GPU does)."""
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    data = _interp._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
    return _interp.TensorHandle(data, tl.float32)


def _create_dot_bf16_safe(self, a, b, d, input_precision, max_num_imprecise_acc):
    return _create_dot(self, _widen_bf16(a), _widen_bf16(b), d, input_precision, max_num_imprecise_acc)


def fp32_to_bf16_bits(data) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), rounded to nearest even as a GPU's cvt.rn.bf16.f32
    (and torch's ``.to(torch.bfloat16)``): overflow goes to ±inf, a NaN stays a (quiet) NaN."""
    data = np.asarray(data, dtype=np.float32)
    bits = data.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(data), ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def _cast_impl_rtne(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        return _interp.TensorHandle(fp32_to_bf16_bits(src.data), tl.bfloat16)
    return _cast_impl(self, src, dst_type)


def patch_interpreter_bf16() -> None:
    """Make the interpreter's ``tl.dot`` widen bf16 operands to fp32 first, and its fp32 -> bf16
    casts round to nearest even (idempotent; other dtypes, and compiled kernels on a GPU, are
    untouched). Call it before a bf16 kernel runs."""
    _interp.InterpreterBuilder.create_dot = _create_dot_bf16_safe
    _interp.InterpreterBuilder.cast_impl = _cast_impl_rtne
