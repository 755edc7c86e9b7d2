"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

Triton decides interpreter-or-compiler when a kernel is decorated (at import of its module), so
the flag is set here, before any test module imports a kernel. Only tests/kernels imports the
Triton modules; the AOT compile test runs in a subprocess without the flag.

On a CUDA machine, ``NLORA_TEST_DEVICE=cuda`` leaves the flag unset and the composed-path test
(``-k triton_path_against_truth``) runs the compiled kernels on the GPU (bench/gpu_check.sh).
"""

import os

INTERPRET = os.environ.get("NLORA_TEST_DEVICE", "cpu") == "cpu"
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

_create_dot = _interp.InterpreterBuilder.create_dot


def _widen_bf16(handle):
    """The interpreter stores bf16 as raw uint16 bits; widen exactly to fp32 (as a GPU does)."""
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    data = _interp._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
    return _interp.TensorHandle(data, tl.float32)


def _create_dot_bf16_safe(self, a, b, d, input_precision, max_num_imprecise_acc):
    # Triton 3.9's interpreter multiplies bf16 operands' raw bit patterns as integers (its
    # create_dot only converts fp8), which turns a correct bf16 tl.dot into garbage on the CPU.
    return _create_dot(self, _widen_bf16(a), _widen_bf16(b), d, input_precision,
                       max_num_imprecise_acc)


if INTERPRET:
    _interp.InterpreterBuilder.create_dot = _create_dot_bf16_safe
