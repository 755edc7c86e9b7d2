"""Load shapes with an in-process target: open loop sends on the workload's arrival times (capped
when asked), closed loop keeps the concurrency, bounds hold, and a raising target is recorded."""

from __future__ import annotations

import asyncio
import time

import pytest

from nlora_serve.client.bench.runner import LoadShape, run_load
from nlora_serve.client.bench.targets import RequestResult
from nlora_serve.client.bench.workload import LengthDist, Workload, WorkloadConfig


class SleepTarget:
    """Answers every request after ``hold_s`` with one chunk; request 3 raises."""

    name = "fake"

    def __init__(self, hold_s: float):
        self.hold_s, self.in_flight, self.peak = hold_s, 0, 0

    async def send(self, req, run_start):
        res = RequestResult(req.index, req.tenant, time.perf_counter() - run_start)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        t0 = time.perf_counter()
        try:
            await asyncio.sleep(self.hold_s)
            if req.index == 3:
                raise RuntimeError("target broke")
            res.chunk(t0)
            res.output_tokens = 1
        finally:
            self.in_flight -= 1
        res.e2e_s = time.perf_counter() - t0
        return res


def _workload(rate: float) -> Workload:
    return Workload(WorkloadConfig(seed=1, rate=rate, prompt_len=LengthDist(2, 2), output_len=LengthDist(1, 1)))


def test_open_loop_sends_on_arrival_times_whatever_the_server_does():
    workload, target = _workload(rate=40.0), SleepTarget(hold_s=0.2)
    run = asyncio.run(run_load(workload, target, LoadShape("open", 0, num_requests=20), progress=False))
    arrivals = [r.arrival_s for r in workload.requests(count=20)]
    assert [r.index for r in run.results] == list(range(20))
    assert all(abs(r.start_s - a) < 0.05 for r, a in zip(run.results, arrivals))
    assert target.peak > 4  # 40 req/s × 0.2 s each overlap
    assert run.results[3].error == "RuntimeError" and run.results[3].error_message == "target broke"
    assert run.duration_s >= arrivals[-1] + 0.2


def test_open_loop_cap_and_closed_loop_concurrency():
    capped = SleepTarget(hold_s=0.05)
    asyncio.run(run_load(_workload(float("inf")), capped, LoadShape("open", 3, num_requests=12), False))
    assert capped.peak == 3
    closed = SleepTarget(hold_s=0.05)
    run = asyncio.run(run_load(_workload(1.0), closed, LoadShape("closed", 4, num_requests=12), False))
    assert closed.peak == 4 and len(run.results) == 12
    assert run.duration_s == pytest.approx(3 * 0.05, abs=0.05)  # 12 requests, 4 at a time, arrivals ignored


def test_duration_bound_in_closed_loop():
    target = SleepTarget(hold_s=0.05)
    run = asyncio.run(run_load(_workload(1.0), target, LoadShape("closed", 2, duration_s=0.5), False))
    assert 14 <= len(run.results) <= 22 and 0.5 <= run.duration_s < 0.65
    with pytest.raises(ValueError, match="exactly one"):
        LoadShape("closed", 2, num_requests=5, duration_s=1.0)
