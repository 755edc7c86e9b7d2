"""Seeded workloads: reproducible, and drawn from the distributions they claim."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nlora_serve.client.bench.workload import LengthDist, TenantMix, Workload, WorkloadConfig

NAMES = TenantMix.numbered("tenant-", 8)


def _config(**overrides) -> WorkloadConfig:
    base = dict(seed=7, tenants=TenantMix(NAMES, "zipf", 1.0, 0.1), prompt_len=LengthDist(4, 32),
                output_len=LengthDist(2, 9), rate=5.0, burstiness=0.5)
    return WorkloadConfig(**{**base, **overrides})


def test_same_seed_same_requests_and_a_longer_run_extends_a_shorter_one():
    first = list(Workload(_config()).requests(count=50))
    again = list(Workload(_config()).requests(count=80))
    assert again[:50] == first
    other = list(Workload(_config(seed=8)).requests(count=50))
    assert [r.prompt for r in other] != [r.prompt for r in first]
    assert [r.arrival_s for r in first] == sorted(r.arrival_s for r in first) and first[0].arrival_s == 0.0


def test_lengths_within_their_ranges_and_token_ids_inside_the_synthetic_range():
    reqs = list(Workload(_config()).requests(count=400))
    assert {len(r.prompt) for r in reqs} == set(range(4, 33))  # every value of 4..32 drawn
    assert {r.output_len for r in reqs} == set(range(2, 10))
    assert all(1000 <= t < 20000 for r in reqs for t in r.prompt)
    assert len({r.seed for r in reqs}) == len(reqs)


def test_zipf_frequencies_follow_one_over_rank_and_base_share_holds():
    reqs = list(Workload(_config(rate=math.inf)).requests(count=20000))
    base = sum(r.tenant is None for r in reqs)
    assert abs(base / len(reqs) - 0.1) < 0.01
    counts = np.array([sum(r.tenant == n for r in reqs) for n in NAMES], dtype=float)
    want = 1.0 / np.arange(1, 9)  # hand-written Zipf(1) weights
    assert np.allclose(counts / counts.sum(), want / want.sum(), atol=0.01)
    assert all(r.arrival_s == 0.0 for r in reqs)


def test_round_robin_and_uniform_and_base_only():
    rr = [r.tenant for r in Workload(_config(tenants=TenantMix(NAMES[:3], "round-robin"))).requests(count=7)]
    assert rr == ["tenant-000", "tenant-001", "tenant-002"] * 2 + ["tenant-000"]
    uni = [r.tenant for r in Workload(_config(tenants=TenantMix(NAMES, "uniform"))).requests(count=8000)]
    assert all(abs(uni.count(n) / 8000 - 1 / 8) < 0.02 for n in NAMES)
    assert {r.tenant for r in Workload(_config(tenants=TenantMix())).requests(count=20)} == {None}


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_arrivals_have_the_asked_rate_and_burstiness(burstiness):
    reqs = list(Workload(_config(rate=20.0, burstiness=burstiness)).requests(count=6000))
    gaps = np.diff([r.arrival_s for r in reqs])
    assert abs(gaps.mean() - 1 / 20) < 0.05 / 20 * 3
    cv2 = gaps.var() / gaps.mean() ** 2  # Gamma(k): squared coefficient of variation = 1 / k
    assert abs(cv2 - 1 / burstiness) < 0.15 / burstiness


def test_duration_bound_stops_at_the_first_arrival_past_it():
    reqs = list(Workload(_config(rate=10.0)).requests(duration_s=3.0))
    assert reqs[-1].arrival_s < 3.0 and 15 < len(reqs) < 50
    nxt = list(Workload(_config(rate=10.0)).requests(count=len(reqs) + 1))[-1]
    assert nxt.arrival_s >= 3.0


def test_prompt_file_cycles_in_order_with_its_output_lengths(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "hello", "output_len": 3}), "",
                               json.dumps({"prompt_token_ids": [5, 6, 7]})]))
    reqs = list(Workload(_config(prompt_file=str(path), output_len=LengthDist(9, 9))).requests(count=3))
    assert [(r.prompt, r.output_len) for r in reqs] == [("hello", 3), ((5, 6, 7), 9), ("hello", 3)]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        Workload(_config(prompt_file=str(tmp_path / "bad.jsonl")))


def test_names_and_lengths_parse():
    assert TenantMix.numbered("t-", 1001)[-1] == "t-1000" and TenantMix.numbered("t-", 2) == ("t-000", "t-001")
    assert LengthDist.parse("64:256") == LengthDist(64, 256) and str(LengthDist.parse("128")) == "128"
    with pytest.raises(ValueError):
        LengthDist.parse("9:3")


@pytest.mark.parametrize("overrides", [dict(rate=math.nan), dict(rate=0.0), dict(burstiness=math.nan),
                                       dict(burstiness=math.inf)])
def test_nan_and_out_of_range_rates_are_refused(overrides):
    # `bench --rate nan` used to pass `rate <= 0` and run a workload of NaN arrival times
    with pytest.raises(ValueError, match="needs rate > 0"):
        _config(**overrides)


@pytest.mark.parametrize("alpha, base_share", [(math.nan, 0.1), (1.0, math.nan), (-1.0, 0.1)])
def test_nan_zipf_alpha_or_base_share_is_refused(alpha, base_share):
    with pytest.raises(ValueError, match="TenantMix needs"):
        TenantMix(NAMES, "zipf", alpha, base_share)
