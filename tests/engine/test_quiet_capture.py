"""CUDA graph captures without torch.cuda.graph's gc.collect / empty_cache (engine/runner/cuda_graphs.py
``quiet_capture``), checked on the CPU: the no-ops hold inside and the originals come back after,
an exception included; CudaGraphCapture enters torch.cuda.graph inside them (torch's CUDA calls
replaced by fakes that record what torch.cuda.graph's __enter__ would call)."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from nlora_serve.engine.runner.cuda_graphs import CudaGraphCapture, quiet_capture


class _Cycle:
    pass


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _garbage_cycle() -> weakref.ref:
    a, b = _Cycle(), _Cycle()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_no_collect_or_empty_cache_inside_and_originals_after():
    collect, empty = gc.collect, torch.cuda.empty_cache
    was_enabled = gc.isenabled()
    gc.disable()  # only the explicit collect below may free the cycle
    try:
        with pytest.raises(KeyError):
            with quiet_capture():
                ref = _garbage_cycle()
                assert gc.collect() == 0 and ref() is not None  # nothing collected
                assert torch.cuda.empty_cache() is None and torch.cuda.empty_cache is not empty
                raise KeyError  # the originals come back on an error too
        assert gc.collect is collect and torch.cuda.empty_cache is empty
        gc.collect()
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()


def test_cuda_graph_capture_enters_torch_cuda_graph_quietly(monkeypatch):
    real = gc.collect, torch.cuda.empty_cache
    seen = []

    class FakeGraph:
        def __init__(self, graph, pool=None, capture_error_mode="global"):
            pass

        def __enter__(self):  # what torch.cuda.graph.__enter__ calls
            seen.append((gc.collect is real[0], torch.cuda.empty_cache is real[1]))
            gc.collect()
            torch.cuda.empty_cache()

        def __exit__(self, *exc):
            return False

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _Null())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(pool=lambda: "pool", replay=lambda: None))
    monkeypatch.setattr(torch.cuda, "graph", FakeGraph)
    capture = CudaGraphCapture()
    _, out = capture.capture(lambda: torch.ones(2))
    assert seen == [(False, False)] and capture.pool == "pool" and out.tolist() == [1.0, 1.0]
    assert (gc.collect, torch.cuda.empty_cache) == real


def test_overlapping_windows_restore_the_originals_once_the_last_ends():
    # two captures overlapping (two engines' step threads in one process): the second saved the
    # first's no-ops as "originals" and, ending last, left gc.collect and empty_cache no-ops for good
    from contextlib import ExitStack

    real = gc.collect, torch.cuda.empty_cache
    first, second = ExitStack(), ExitStack()
    first.enter_context(quiet_capture())
    second.enter_context(quiet_capture())
    first.close()
    assert gc.collect() == 0 and torch.cuda.empty_cache is not real[1]  # the second's window still holds
    second.close()
    assert (gc.collect, torch.cuda.empty_cache) == real
