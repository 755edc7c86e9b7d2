"""Building the native CPU ops' shared library (``kernels/cpu/*.c``) for :mod:`kernels.cpu.native`.

The C sources are compiled on first use with the system C compiler (``cc -O3 -march=native``, one
process per source at once: :func:`compile_library`) into
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
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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
    # once per source change and CPU, but 10-40 s on 2 cores: without a word, a first start looks hung
    log.info("compiling the native CPU ops with %s into %s (once; later starts load it; about 10-40 s on "
             "2 cores)...", compiler, target)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=build_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        for extra in ((OPENMP,), ()):  # without OpenMP only where the compiler lacks it
            try:
                compile_library(compiler, (*FLAGS, *extra), Path(tmp))
                break
            except subprocess.CalledProcessError:
                if not extra:
                    raise
                log.info("native CPU ops: %s without OpenMP; threaded calls start their own threads", compiler)
        os.replace(tmp, target)
        log.info("compiled the native CPU ops in %.1f s", time.perf_counter() - start)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def compile_library(compiler: str, flags: Sequence[str], out: Path, timeout_s: float = 300) -> None:
    """Compile :data:`SOURCES` with ``flags`` and link them into the shared library ``out``.

    Each source compiles in a cc process of its own, as many at once as this process may use CPUs,
    the largest first, into a temporary folder beside ``out``; then one link. The largest sources
    bound it: on 2 cores a build takes about half as long as one cc over all of them (an AVX2-only
    build 47 s -> ~25 s, its two attention sources 22 s and 15 s).

    Raises:
        subprocess.CalledProcessError (its stderr on the exception) / TimeoutExpired: a source did
            not compile within ``timeout_s``, or the link failed.
    """
    def run(args: list[str]) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=timeout_s)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".objects-") as objects:
        sources = sorted(SOURCES, key=lambda src: src.stat().st_size, reverse=True)
        outputs = [os.path.join(objects, f"{src.stem}.o") for src in sources]
        with ThreadPoolExecutor(max(1, min(cpus, len(sources)))) as pool:
            for done in [pool.submit(run, [compiler, *flags, "-c", "-o", obj, str(src)])
                         for src, obj in zip(sources, outputs)]:
                done.result()  # the first failure raises, with its stderr
        run([compiler, *flags, "-o", str(out), *outputs])


def _cpu_id() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + flags
