"""bench/soak_report.py: the numbers and verdict of a soak run (bench/soak.py), on made-up samples
and on a real ServerMetrics exposition (so a renamed gauge fails here, not silently in a soak)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from soak_report import GAUGES, parse_metrics, proc_sample, slope_per_hour, verdict  # noqa: E402

from nlora_serve.serving.metrics import ServerMetrics  # noqa: E402

STATS = {"running": 3, "waiting": 2, "kv_blocks_used": 7, "kv_blocks_total": 136, "preemptions": 5}


def _run(rss=lambda t: 1150.0, admitted_idle=0.0, fds_idle=15, log=""):
    base = {"t": 0.0, "phase": "baseline", "rss_mb": 1120.0, "fds": 15, "threads": 15, "nlora_kv_blocks_total": 136.0}
    load = [{"t": float(t), "phase": "load", "rss_mb": rss(t), "fds": 19, "threads": 26, "nlora_kv_blocks_used": 20.0,
             "nlora_kv_blocks_total": 136.0, "nlora_requests_admitted": 4.0} for t in range(15, 1500, 15)]
    idle = {"t": 1600.0, "phase": "idle", "rss_mb": 1150.0, "fds": fds_idle, "threads": 26, "nlora_kv_blocks_used": 0.0,
            "nlora_kv_blocks_total": 136.0, "nlora_requests_admitted": admitted_idle, "nlora_requests_running": 0.0,
            "adapter_active": 0}
    return [base, *load, idle], log


def test_slope_per_hour_is_least_squares_in_units_per_hour():
    assert slope_per_hour([(t, 100 + 0.01 * t) for t in range(0, 600, 15)]) == pytest.approx(36.0)
    assert slope_per_hour([(t, 5.0) for t in range(0, 100, 10)]) == 0.0
    assert slope_per_hour([(1.0, 2.0)]) != slope_per_hour([(1.0, 2.0)])  # NaN: one point


def test_parse_metrics_reads_every_gauge_of_a_server_exposition():
    metrics = ServerMetrics(lambda: STATS, lambda: (6, 645120), admitted=lambda: 4)
    metrics.ended.labels("http", "finished").inc(3)
    metrics.rejected.labels("queue_full", "grpc").inc()
    got = parse_metrics(metrics.exposition()[0].decode())
    assert set(GAUGES) <= set(got), set(GAUGES) - set(got)
    assert (got["nlora_requests_running"], got["nlora_requests_waiting"], got["nlora_requests_admitted"]) == (3, 2, 4)
    assert (got["nlora_kv_blocks_used"], got["nlora_num_preemptions_total"], got["nlora_adapters_resident"]) == (7, 5, 6)
    assert got['ended{frontend="http",outcome="finished"}'] == 3
    assert got['rej{frontend="grpc",reason="queue_full"}'] == 1
    assert not any(k.startswith("rej") and "draining" in k for k in got)  # zero refusals are left out


def test_verdict_is_empty_for_a_clean_run_and_names_each_problem():
    assert verdict(*_run()) == []
    problems = verdict(*_run(rss=lambda t: 1100 + t / 36, admitted_idle=1.0, fds_idle=30,
                             log="2026-12-07T18:00:00.000Z ERROR nlora_serve.x: boom\nTraceback (most recent call last):"))
    text = "\n".join(problems)
    assert "nlora_requests_admitted is 1.0" in text
    assert "fds 15 at baseline, 30 at idle" in text
    assert "RSS grew 100.0 MB/h" in text
    assert sum(p.startswith("log: ") for p in problems) == 2
    short = [s for s in _run(rss=lambda t: 1100 + t / 36)[0] if s["t"] < 400 or s["phase"] != "load"]
    assert verdict(short) == []  # 200 s of second half: warm-up, not judged
    with pytest.raises(ValueError, match="baseline, load and idle"):
        verdict(_run()[0][:-1])


def test_proc_sample_reads_this_process():
    s = proc_sample(os.getpid())
    assert s["rss_mb"] > 10 and s["threads"] >= 1
    assert abs(s["fds"] - len(os.listdir("/proc/self/fd"))) <= 2 and sum(s["fd_kinds"].values()) <= s["fds"]


def test_churn_table_counts_the_logs_loads_and_cold_loads_up_to_each_sample(tmp_path, capsys):
    """bench/soak_churn.py's table: loads (HTTP loads, gRPC uploads), cold loads (evictions) and swaps
    the server log has by each sample's wall time (t0 + t), every ``every`` seconds and the last."""
    import json

    from soak_churn import table

    (tmp_path / "t0").write_text("1796676600.5")  # 2026-12-07T20:50:00.500Z
    rows = [(0, "baseline", 1300.0), (300, "load", 1400.4), (600, "load", 1450.0), (700, "idle", 1449.6)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"t": t, "phase": p, "rss_mb": r}) + "\n"
                                                    for t, p, r in rows))
    log = ["2026-12-07T20:50:00.400Z INFO x: evicted adapter lora-a v1 from LoRA slot 0",
           "2026-12-07T20:51:00.000Z INFO x: /v1/load_lora_adapter by 'ops': adapter 'churn-0' v1 serving",
           "2026-12-07T20:54:59.000Z INFO x: UploadAdapter by 'ops': adapter 'churn-1' v1 serving",
           "2026-12-07T20:55:00.600Z INFO x: evicted adapter lora-b v1 from LoRA slot 1",  # after t = 300
           "2026-12-07T20:56:00.000Z INFO x: SwapAdapter by 'ops': adapter 'lower' v2 serving",
           "2026-12-07T20:56:00.000Z INFO x: /v1/unload_lora_adapter by 'ops': adapter 'churn-0' v1 unloaded"]
    (tmp_path / "server.log").write_text("\n".join(log) + "\n")
    table(tmp_path, every=600)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["| 0 | baseline | 1,300 | 0 | 1 | 0 |", "| 10 | load | 1,450 | 2 | 2 | 1 |",
                         "| 12 | idle | 1,450 | 2 | 2 | 1 |", "max RSS 1,450 MB"]
