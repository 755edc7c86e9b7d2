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

from triton_interpreter import patch_interpreter_bf16  # noqa: E402 (tests/, on sys.path through tests/conftest.py)

if INTERPRET:
    patch_interpreter_bf16()  # its bf16 tl.dot and fp32 -> bf16 cast, as a GPU does them (tests/triton_interpreter.py)
