"""The native ops' C sources build for x86-64 CPUs without AVX-512 or AMX too (kernels/cpu/build.py).

The library is compiled with -march=native, so a machine only ever builds its own variant; these
compile the same sources for older instruction sets here, where a build break would otherwise
surface only on a user's AVX2 machine (there the engine falls back to the slower torch path).
"""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from nlora_serve.kernels.cpu.build import FLAGS, OPENMP, SOURCES

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("cc"),
                                reason="x86-64 instruction-set variants need an x86-64 C compiler")


def test_sources_compile_for_avx2_without_avx512(tmp_path):
    """x86-64-v3: AVX2 + FMA, the newest level without AVX-512 (e.g. AMD Zen 1-3)."""
    flags = ["-march=x86-64-v3" if f == "-march=native" else f for f in FLAGS]
    out = subprocess.run(["cc", *flags, OPENMP, "-o", str(tmp_path / "lib.so"), *map(str, SOURCES)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    symbols = subprocess.run(["nm", "-D", str(tmp_path / "lib.so")], capture_output=True, text=True).stdout
    assert "nlora_tied_apply_bf16_mt" in symbols and "nlora_amx_init" in symbols
    assert "nlora_tied_apply_bf16_amx_mt" not in symbols  # no AMX code without the instruction set
