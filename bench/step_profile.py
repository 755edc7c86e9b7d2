"""A torch.profiler breakdown of a few decode steps: where the device time goes, and how much of
the step's wall time the host spends off the device (bench/decode_step.py writes it into its JSON).

On CUDA: the top kernels (memcpys and memsets included) by total device time with their share of
it, the device's busy time per step (sum of those durations: kernels run one at a time on one
stream, so this is the time the GPU works), and the host's time per step, taken as the wall time
minus the time the host sat blocked in CUDA runtime calls that wait for the device (synchronize,
blocking copies). Off CUDA (the CPU logic runs) the rows are the top ops by self CPU time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# CUDA runtime calls in which the host waits for the device (the D2H copy of sampled tokens and
# the timing's synchronize); whatever else the host does in a step is its own work
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
            "cudaMemcpyAsync")


def profile_steps(step: Callable[[], object], device: str, steps: int = 10, top: int = 10) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler (after one unprofiled call).

    Returns {"steps", "wall_ms_per_step", "device_ms_per_step", "host_ms_per_step",
    "device_busy_share", "top": [{"name", "ms_per_step", "share", "calls_per_step"}]} with
    milliseconds per step; the device fields are None off CUDA. A profiler that fails (no CUPTI)
    gives {"error": message} instead: the breakdown is a diagnosis, never the measurement itself.
    """
    try:
        return _profile(step, device, steps, top)
    except Exception as exc:  # noqa: BLE001 (the timing around it must still be written)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _profile(step: Callable[[], object], device: str, steps: int, top: int) -> dict:
    cuda = device.startswith("cuda")
    step()
    _sync(cuda)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(cuda)
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.events()
    totals: dict[str, list[float]] = {}
    if cuda:
        for e in events:
            if e.device_type == DeviceType.CUDA:
                row = totals.setdefault(e.name, [0.0, 0])
                row[0] += e.time_range.elapsed_us()
                row[1] += 1
        blocked = sum(e.time_range.elapsed_us() for e in events
                      if e.device_type == DeviceType.CPU and e.name in BLOCKING)
    else:
        totals = {a.key: [a.self_cpu_time_total, a.count] for a in prof.key_averages()}
        blocked = 0.0
    busy = sum(t for t, _ in totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": steps, "wall_ms_per_step": wall_us / steps / 1e3,
            "device_ms_per_step": busy / steps / 1e3 if cuda else None,
            "host_ms_per_step": (wall_us - blocked) / steps / 1e3,
            "device_busy_share": busy / wall_us if cuda else None,
            "top": [{"name": name[:120], "ms_per_step": t / steps / 1e3, "share": t / busy if busy else 0.0,
                     "calls_per_step": n / steps} for name, (t, n) in rows]}


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
