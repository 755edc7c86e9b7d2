"""Drive a workload against a target: open loop (arrivals at a rate) or closed loop (fixed
concurrency), bounded by a request count or a duration, with a live tqdm progress bar.

Open loop sends request i at its arrival time whatever the server is doing (so queueing shows up
in TTFT), optionally capped at ``max_concurrency`` in flight as vLLM ``benchmarks/serve`` does.
Closed loop keeps exactly ``concurrency`` requests in flight: each worker sends the next request
as soon as its previous one ends, ignoring the workload's arrival times.

A run whose first :data:`FIRST_REQUESTS` results all fail with one error code that retrying would
not cure (an unknown model, a bad key: anything but overload) stops sending: what is in flight
finishes and :attr:`RunRecord.stopped` gives the cause, once, instead of the same error N times.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from tqdm import tqdm

from nlora_serve.client.bench.targets import RequestResult
from nlora_serve.client.bench.workload import BenchRequest, Workload

MODES = ("open", "closed")
FIRST_REQUESTS = 8  # results that decide an early stop (fewer when the run sends fewer)
TRANSIENT = ("HTTP 429", "HTTP 503", "RESOURCE_EXHAUSTED", "UNAVAILABLE")  # overload: no reason to stop


def is_transient(code: str) -> bool:
    """An overload's error code (one of :data:`TRANSIENT`, an HTTP one with the server's reason
    after it: "HTTP 429 queue_full")."""
    return any(code == t or code.startswith(t + " ") for t in TRANSIENT)


@dataclass(frozen=True, slots=True)
class LoadShape:
    """How requests are sent; exactly one of ``num_requests`` and ``duration_s`` bounds the run."""

    mode: str = "closed"  # "open" (arrivals at the workload's rate) or "closed" (fixed concurrency)
    concurrency: int = 8  # closed: requests in flight; open: cap on them (0 = none)
    num_requests: int | None = None  # requests to send
    duration_s: float | None = None  # seconds during which new requests start; in-flight ones finish

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LoadShape.mode must be one of {MODES}; got {self.mode!r}")
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError("LoadShape needs exactly one of num_requests and duration_s")
        if self.concurrency < (1 if self.mode == "closed" else 0):
            raise ValueError(f"LoadShape.concurrency must be >= 1 in closed loop (>= 0 open); got {self.concurrency}")
        if (self.num_requests or 1) < 1 or (self.duration_s or 1) <= 0:
            raise ValueError("LoadShape needs num_requests >= 1 or duration_s > 0")


@dataclass(slots=True)
class RunRecord:
    """Every request's result, and the run's wall time in seconds (start to the last request's end)."""

    results: list[RequestResult]
    duration_s: float
    stopped: str | None = None  # why the run stopped early (the first requests' common error), else None


def stop_cause(results: list[RequestResult], first: int) -> str | None:
    """The cause to stop on when the first ``first`` results all failed with one non-transient
    code, naming the code, the tenants (models) asked for and the server's message; else None."""
    head = results[:first]
    codes = {r.error for r in head}
    if len(head) < first or len(codes) != 1 or None in codes or is_transient(head[0].error):
        return None
    tenants = sorted({r.tenant or "(base model)" for r in head})
    return (f"the first {first} requests all failed with {head[0].error} (tenants asked for: {', '.join(tenants)}): "
            f"{head[0].error_message}")


async def run_load(workload: Workload, target, shape: LoadShape, progress: bool = True) -> RunRecord:
    """Run ``workload`` against an entered ``target``. A request whose ``send`` raises is recorded
    with the exception's class name as its error code; the run itself goes on, unless its first
    requests all fail alike (see the module docstring)."""
    bar = tqdm(total=shape.num_requests, unit="req", desc=f"bench {target.name} ({shape.mode} loop)",
               disable=not progress, dynamic_ncols=True)
    results: list[RequestResult] = []
    start = time.perf_counter()
    first = min(FIRST_REQUESTS, shape.num_requests or FIRST_REQUESTS)
    halt, cause = asyncio.Event(), []

    async def one(req: BenchRequest) -> None:
        sent = time.perf_counter()
        try:
            res = await target.send(req, start)
        except Exception as exc:  # a bench records failures, it does not stop on them
            res = RequestResult(req.index, req.tenant, sent - start, e2e_s=time.perf_counter() - sent)
            res.fail(type(exc).__name__, str(exc))
        results.append(res)
        bar.update(1)
        if res.error:
            bar.set_postfix(errors=sum(not r.ok for r in results), refresh=False)
        if len(results) == first and (why := stop_cause(results, first)):
            cause.append(why)
            halt.set()

    with bar:
        if shape.mode == "open":
            await _open_loop(workload, shape, one, start, halt)
        else:
            await _closed_loop(workload, shape, one, start, halt)
    results.sort(key=lambda r: r.index)
    return RunRecord(results, time.perf_counter() - start, cause[0] if cause else None)


async def _open_loop(workload: Workload, shape: LoadShape, one, start: float, halt: asyncio.Event) -> None:
    cap = asyncio.Semaphore(shape.concurrency) if shape.concurrency else contextlib.nullcontext()

    async def capped(req: BenchRequest) -> None:
        async with cap:
            if not halt.is_set():  # queued behind the cap when the run stopped: never sent
                await one(req)

    tasks = []
    for req in workload.requests(shape.num_requests, shape.duration_s):
        delay = start + req.arrival_s - time.perf_counter()
        if delay > 0:
            with contextlib.suppress(TimeoutError):  # the arrival time, unless the run stops first
                await asyncio.wait_for(halt.wait(), delay)
        if halt.is_set():
            break
        tasks.append(asyncio.create_task(capped(req)))
    await asyncio.gather(*tasks)


async def _closed_loop(workload: Workload, shape: LoadShape, one, start: float, halt: asyncio.Event) -> None:
    source = workload.requests(shape.num_requests)  # shared: each worker takes the next request

    async def worker() -> None:
        for req in source:
            if halt.is_set() or (shape.duration_s is not None and time.perf_counter() - start >= shape.duration_s):
                return
            await one(req)

    await asyncio.gather(*(worker() for _ in range(shape.concurrency)))
