"""Torch's CPU threads belong to the engine's step thread.

torch runs its parallel CPU ops (GEMMs, elementwise ops above ~32k elements) on OpenMP, GNU
libgomp in the PyPI wheels; our native ops run on the same runtime (kernels/cpu/parallel.h).
libgomp keeps a team of worker threads for every thread that ever ran a parallel region and
counts them all. Once that count exceeds the CPUs, it throttles: a worker spins only ~100
iterations after a region before it sleeps on a futex, so every parallel op of every thread pays
a wake-up. The native engine steps in its own thread (``LLMEngine``); the thread that loaded the
model, ran a reference model or anything else in parallel kept its team, and from then on the step
thread ran throttled. Measured on a 2-core Xeon (2026-12-05, bench/RESULTS.md): a
[64, 576] fp32 += bf16 add in a second thread 8 µs → 90-120 µs once the first thread had run one
2-thread op, a decode GEMM on 1.4 of the 2 cores instead of 1.9, and the bf16 decode step of the
§9 workload 78 → 57 ms when only the step thread ran parallel.

So a serving process keeps one multi-threaded thread, the step thread: ``serve``, ``generate``
and the benches run inside :func:`threads_for_engine`, entered in their main thread before any
torch work, and the step thread takes the threads (:func:`engine_threads`). A library user who built
the engine after parallel torch work elsewhere gets the same results, only slower ops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from nlora_serve.engine.host_memory import keep_freed_memory

_reserved: int | None = None  # the count threads_for_engine took from its thread, while it lasts


@contextmanager
def threads_for_engine() -> Iterator[int]:
    """While it lasts, the calling thread runs torch single-threaded and every engine built
    meanwhile gives that thread's count to its step thread. Enter it first, in the main thread,
    before any torch work (a team once started stays counted). Yields the count (≥ 1); the
    calling thread gets it back on exit. Entering it also makes this a serving process for the C
    allocator (:func:`nlora_serve.engine.host_memory.keep_freed_memory`, not undone on exit;
    ``NLORA_MALLOC_TUNING=0`` in the environment leaves glibc's defaults)."""
    global _reserved
    if os.environ.get("NLORA_MALLOC_TUNING", "1") != "0":  # a serving process: step buffers stay mapped
        keep_freed_memory()  # between steps (engine/host_memory.py)
    count, previous = torch.get_num_threads(), _reserved
    _reserved = count
    torch.set_num_threads(1)
    try:
        yield count
    finally:
        _reserved = previous
        torch.set_num_threads(count)


def engine_threads(configured: int | None) -> int:
    """The step thread's torch thread count: ``configured`` (EngineConfig.cpu_threads) when set,
    else what :func:`threads_for_engine` holds, else the calling thread's count."""
    if configured is not None:
        return configured
    return _reserved if _reserved is not None else torch.get_num_threads()


def on_device(device: torch.device) -> AbstractContextManager:
    """The calling thread's current CUDA device is ``device`` within the block (a no-op context
    for a CPU device). Triton launches, ``torch.cuda.current_stream()``, ``torch.cuda.Stream()``
    and ``Event.record()`` act on the thread's current device, not on their tensors': with
    ``--device cuda:1`` and no such context the engine's kernels, graph captures and read-back
    events went to GPU 0. The engine's constructor and its step thread run inside it."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
