"""engine/host_memory.py: in a serving process a step's freed buffers are reused, not faulted in anew.

Each case runs in its own interpreter (the allocator's settings are process-wide): a thread that,
like the engine's step thread, allocates and writes a prefill step's worth of activations (~95 MB in
seven buffers of 5-25 MB) and frees them, twelve times; the minor page faults of each step are
counted. Untuned, glibc unmaps the freed memory and every step faults thousands of pages in again;
tuned, the steps settle and fault nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys, threading
import torch
from nlora_serve.engine.host_memory import keep_freed_memory
tuned = sys.argv[1] == "1" and keep_freed_memory()
faults = []
def steps():
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        sizes = (6_300_000, 3_100_000, 1_200_000, 6_300_000, 3_100_000, 1_200_000, 2_400_000)  # fp32 elements
        buffers = [torch.empty(n).fill_(1.0) for n in sizes]
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(json.dumps({"tuned": tuned, "faults": faults}))
"""

PAGES_A_STEP = 23_700  # the buffers' 4 KiB pages: 23.3 million fp32 elements


def _faults(tuned: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _is_glibc() -> bool:
    import platform
    return platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _is_glibc(), reason="the tuning is glibc's mallopt; elsewhere it is a no-op")
def test_tuned_steps_settle_to_no_page_faults():
    result = _faults(tuned=True)
    assert result["tuned"] is True
    faults = result["faults"]
    assert faults[0] > PAGES_A_STEP // 2, faults  # the first step does fault its pages in (the probe measures)
    assert max(faults[-4:]) <= PAGES_A_STEP // 100, f"steps still fault pages in after settling: {faults}"


@pytest.mark.skipif(not _is_glibc(), reason="the tuning is glibc's mallopt; elsewhere it is a no-op")
def test_untuned_steps_fault_every_time():
    """The control: without the tuning the same steps keep faulting (what the tuning is for)."""
    result = _faults(tuned=False)
    assert result["tuned"] is False
    assert min(result["faults"][-4:]) > PAGES_A_STEP // 10, result["faults"]


@pytest.mark.parametrize("setting, calls", [(None, 1), ("1", 1), ("0", 0)])
def test_threads_for_engine_tunes_the_allocator_unless_told_not_to(monkeypatch, setting, calls):
    import nlora_serve.engine.threads as threads
    made = []
    monkeypatch.setattr(threads, "keep_freed_memory", lambda: made.append(1) or True)
    if setting is None:
        monkeypatch.delenv("NLORA_MALLOC_TUNING", raising=False)
    else:
        monkeypatch.setenv("NLORA_MALLOC_TUNING", setting)
    with threads.threads_for_engine():
        pass
    assert len(made) == calls
