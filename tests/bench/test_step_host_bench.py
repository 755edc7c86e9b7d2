"""bench/step_host.py, issue 18's host-time-per-step bench, still runs against the engine's adapter
hook: it reads the hook's per-token entries, and a rename there (``_decode`` -> ``_per_token``) broke
it with an AttributeError no test saw. One small measurement, its rows sane."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).parents[2] / "bench" / "step_host.py"


def test_the_host_time_bench_measures_inputs_and_device_derived_adapters():
    spec = importlib.util.spec_from_file_location("step_host_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.measure(16, torch.device("cpu"))
    assert row["seqs"] == 16
    assert row["inputs_us"] > 0 and row["adapters_us"] > 0 and row["host_adapter_batch_us"] > 0
    assert abs(row["total_us"] - row["inputs_us"] - row["adapters_us"]) <= 1  # each rounded to a µs
