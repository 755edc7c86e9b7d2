"""Building the native CPU ops' shared library (``kernels/cpu/*.c``) for :mod:`kernels.cpu.native`.

The C sources are compiled on first use with the system C compiler (``cc -O3 -march=native``) into
a build folder the caller names, keyed by a hash of the sources, headers, flags, CPU and compiler,
written atomically (temp file + rename), so a changed source or another CPU builds anew and two
processes never load a half-written library.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_CPU = Path(__file__).parent  # the C sources sit beside this file
SOURCES = tuple(_CPU / name for name in ("tied_apply.c", "group_apply.c", "group_amx.c", "paged_attention.c",
                                         "paged_prefill.c", "layer_ops.c", "gemm.c"))
# part of the build key
HEADERS = tuple(_CPU / name for name in ("vec16.h", "adapter_tiles.h", "parallel.h", "amx.h", "group_mt.h",
                                         "tied_delta.h"))
# -Werror=implicit-function-declaration: GCC 14 and clang make it an error by default, so an older
# compiler here must fail the same way rather than build what a newer one refuses
FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread",
         "-Werror=implicit-function-declaration")
# tried first: the ops' threads are then torch's own OpenMP workers (cpu/parallel.h says why); a
# compiler without OpenMP builds without it, and every threaded call starts its own threads
OPENMP = "-fopenmp"


def build_library(build_dir: Path) -> Path:
    """The compiled library's path under ``build_dir``, compiling it first if missing.

    Raises:
        OSError: no C compiler on PATH. subprocess.CalledProcessError / TimeoutExpired: the
            compile failed (its stderr is on the exception).
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc) on PATH")
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join((*FLAGS, OPENMP)).encode()
                         + _cpu_id().encode() + compiler.encode()).hexdigest()[:16]
    target = build_dir / f"nlora-cpu-{key}.so"
    if target.is_file():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    # once per source change and CPU, but 20-40 s on 2 cores: without a word, a first start looks hung
    log.info("compiling the native CPU ops with %s into %s (once; later starts load it)...", compiler, target)
    fd, tmp = tempfile.mkstemp(dir=build_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        for extra in ((OPENMP,), ()):  # without OpenMP only where the compiler lacks it
            try:
                subprocess.run([compiler, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES)], check=True,
                               capture_output=True, timeout=120)
                break
            except subprocess.CalledProcessError:
                if not extra:
                    raise
                log.info("native CPU ops: %s without OpenMP; threaded calls start their own threads", compiler)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_id() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags
