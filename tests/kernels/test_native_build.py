"""The native ops' C sources build for x86-64 CPUs without AVX-512 or AMX too (kernels/cpu/build.py).

The library is compiled with -march=native, so a machine only ever builds its own variant; these
compile the same sources for older instruction sets here, where a build break would otherwise
surface only on a user's AVX2 machine (there the engine falls back to the slower torch path).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import re
import shutil
import subprocess

import pytest

from nlora_serve.kernels.cpu.build import FLAGS, OPENMP, build_library, compile_library

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("cc"),
                                reason="x86-64 instruction-set variants need an x86-64 C compiler")


def test_sources_compile_for_avx2_without_avx512(tmp_path):
    """x86-64-v3: AVX2 + FMA, the newest level without AVX-512 (e.g. AMD Zen 1-3)."""
    flags = ["-march=x86-64-v3" if f == "-march=native" else f for f in FLAGS]
    try:
        compile_library(shutil.which("cc"), (*flags, OPENMP), tmp_path / "lib.so")
    except subprocess.CalledProcessError as err:
        pytest.fail(err.stderr.decode()[-3000:])
    symbols = subprocess.run(["nm", "-D", str(tmp_path / "lib.so")], capture_output=True, text=True).stdout
    assert "nlora_tied_apply_bf16_mt" in symbols and "nlora_amx_init" in symbols
    assert "nlora_tied_apply_bf16_amx_mt" not in symbols  # no AMX code without the instruction set


def test_the_library_is_compiled_once_and_the_compile_is_logged(tmp_path, caplog):
    """A newcomer's find (h76): a fresh cache's first `serve` sat 19-35 s on "starting the native
    engine" while cc compiled these sources, with no word of it. The compile is logged as it starts;
    the next build finds the library and neither compiles nor logs."""
    with caplog.at_level(logging.INFO, logger="nlora_serve.kernels.cpu.build"):
        built = build_library(tmp_path)
        first = [r.getMessage() for r in caplog.records]
        caplog.clear()
        again = build_library(tmp_path)
        second = [r.getMessage() for r in caplog.records]
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert first[0] == (f"compiling the native CPU ops with {compiler} into {built} (once; later starts load it; "
                        "about 10-40 s on 2 cores)...")
    assert re.fullmatch(r"compiled the native CPU ops in \d+\.\d s", first[-1])  # how long it took, once done
    assert again == built and second == [] and [p.name for p in tmp_path.iterdir()] == [built.name]
    assert hasattr(ctypes.CDLL(str(built)), "nlora_tied_apply_bf16_mt")
