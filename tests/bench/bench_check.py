"""Helpers of the bench tests that run against a real server: its counters, and a bench run's JSON."""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from nlora_serve.cli import main
from nlora_serve.client.bench.workload import BenchRequest, TenantMix, Workload, WorkloadConfig


def scrape(port: int, reason: str | None = None) -> dict[str, float]:
    """Sample values by name, summed over every label set (the request metrics may carry a
    ``frontend`` label or not); with ``reason``, only the samples labelled with it."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if reason is None or s.labels.get("reason") == reason:
                totals[s.name] += s.value
    return totals


def bench_json(tmp_path, *flags: str) -> dict:
    """Run ``nlora-serve bench *flags`` writing under ``tmp_path``; its JSON (the PNG must exist too)."""
    out = tmp_path / "bench.json"
    assert main(["bench", *flags, "--json", str(out), "--no-progress"]) == 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    return json.loads(out.read_text())


def seeded(count: int, names: tuple[str, ...], seed: int) -> list[BenchRequest]:
    """The first ``count`` requests of the tests' round-robin workload (base share 0.2)."""
    return list(Workload(WorkloadConfig(seed=seed, tenants=TenantMix(names, "round-robin", 1.0, 0.2)))
                .requests(count=count))
