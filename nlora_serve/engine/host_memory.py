"""The C allocator of a serving process: freed step buffers stay mapped for the next step.

torch's CPU tensors come from glibc's malloc. By default glibc serves big blocks with mmap and
hands freed memory at the top of a heap back to the kernel once more is free than its trim
threshold, and both thresholds follow the largest block freed so far (at most 32 / 64 MiB). An
engine step allocates and frees tens of MB of activations (a 2,048-token fp32 prefill step of the
default model: 25 MB for the gate/up output alone, ~100 MB over a layer), so each step gave its
memory back and faulted every page in again. Measured (bench/cpu_breakdown.py, §9 workload after
an untimed pass, 2-core EPYC, bench/RESULTS.md): 0.14-0.98 million minor faults in one timed pass,
up to 2 s of kernel time; the layer ops that first write a step's buffers ran 2-5× slower.

:func:`keep_freed_memory` sets M_MMAP_THRESHOLD to 32 MiB (glibc's largest: bigger blocks still
come from mmap), M_TRIM_THRESHOLD to 512 MiB, so the heap keeps up to that much free memory
mapped for reuse, and M_ARENA_MAX to 1: a thread other than the main one gets heaps of at most
64 MiB, and glibc unmaps such a heap whenever it is entirely free, whatever the thresholds, which is
what the engine's step thread did to its activations every step. One arena is one lock, taken
uncontended: the step thread makes nearly all large allocations. This is the job tcmalloc does
for vLLM's CPU backend, whose docs preload it. Only in a serving process
(:func:`nlora_serve.engine.threads.threads_for_engine` calls it, before the step thread starts):
the memory stays with the process instead of going back to the system between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # bytes: blocks from this size on come from mmap (glibc's maximum)
TRIM_THRESHOLD = 512 << 20  # bytes of free memory a heap keeps mapped


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module says; True when done, False where the C library is not
    glibc (nothing changes). Idempotent; affects the whole process."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    done = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not done:
        log.warning("glibc's mallopt refused the serving thresholds; freed step buffers go back to the system")
    return done
