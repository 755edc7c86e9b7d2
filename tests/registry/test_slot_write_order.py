"""Slot writes on the CUDA side stream are ordered after the allocating stream (adapters/runtime/pool.py).

Pool tensors are allocated and zero-filled on the admin thread's current stream; slot writes copy on
a side stream that torch does not sync with it. Without a wait, a write into a fresh table could
run before its zero fill (which erases it) or while an in-flight step still uses the memory the
caching allocator just handed over. Only a GPU shows the race itself; here a fake stream records
the order of waits and copies on the CPU pools.
"""

from __future__ import annotations

import pytest
import torch

from nlora_serve.adapters.runtime import pool as pool_mod
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.runtime.pool import LoraPool, Placement, TiedPool


class _Stream:
    def __init__(self, log: list) -> None:
        self.log = log

    def wait_stream(self, other) -> None:
        self.log.append("wait")


@pytest.fixture
def log(monkeypatch):
    events: list = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "allocating stream")
    real = pool_mod.copy_in

    def copy_in(dst, src, stream=None):
        events.append("copy")
        real(dst, src, None)  # CPU tensors: the plain copy

    monkeypatch.setattr(pool_mod, "copy_in", copy_in)
    return events


def _placement(base, log) -> Placement:
    host = Placement.host(base)
    return Placement(host.device, host.weight, host.bias, _Stream(log))


def test_lora_writes_wait_only_after_an_allocation(base_fp32, log):
    pool = LoraPool(base_fp32, capacity=2, rank=4, placement=_placement(base_fp32, log))
    q = init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=1)
    pool.write(0, q)  # allocates each layer's q_proj tables before writing them
    assert log[0] == "wait" and log.count("copy") > log.count("wait") > 0
    log.clear()
    pool.write(1, q)  # tables exist: no wait (the engine's stream is not waited on for nothing)
    assert "wait" not in log and log
    log.clear()
    v = init_adapter(base_fp32, rank=4, targets=["v_proj"], variant="slora", seed=2)
    pool.write(0, v)  # new v_proj tables: ordered again before their first write
    assert log[0] == "wait"


def test_tied_pool_waits_on_creation_and_after_growth(base_fp32, log):
    adapter = init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="nlora", seed=1)
    tied = TiedPool(base_fp32, "fam", adapter, capacity=1, placement=_placement(base_fp32, log))
    tied.write(tied.take_slot(), adapter)
    assert log[0] == "wait"
    log.clear()
    tied.grow()  # a new n, the old slots copied into it on the allocating stream
    tied.write(tied.take_slot(), adapter)
    assert log[0] == "wait" and log.count("wait") == 1
