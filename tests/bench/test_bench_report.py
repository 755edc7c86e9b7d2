"""Report maths on fixed samples, against hand-computed numbers (vLLM benchmarks/serve definitions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nlora_serve.cli import main
from nlora_serve.client.bench.compare import ratios
from nlora_serve.client.bench.plot import throughput_over_time
from nlora_serve.client.bench.report import Slo, latency_samples, stats_ms, summarize, table, to_json
from nlora_serve.client.bench.runner import RunRecord
from nlora_serve.client.bench.targets import RequestResult


def _req(i, ttft, e2e, out, chunks, start=0.0, error=None) -> RequestResult:
    r = RequestResult(i, "t", start, ttft, e2e, list(chunks), prompt_tokens=10, output_tokens=out)
    if error:
        r.fail(error, "boom")
    return r


# (ttft s, e2e s, output tokens, chunk times s): TPOT = (e2e - ttft) / (out - 1) by hand below
RUN = RunRecord([_req(0, 0.1, 1.0, 10, [0.1, 0.2, 0.4]),        # TPOT 0.1
                 _req(1, 0.2, 0.5, 4, [0.2, 0.3, 0.5], 1.0),    # TPOT 0.1
                 _req(2, 0.3, 2.0, 18, [0.3, 0.6], 1.5),        # TPOT 0.1
                 _req(3, 0.4, 0.4, 1, [0.4], 2.0),              # one token: no TPOT sample
                 _req(4, None, 0.05, 0, [], 2.5, error="NOT_FOUND")], duration_s=4.0)


def test_latency_samples_and_percentiles_by_hand():
    s = latency_samples(RUN.results)
    assert np.allclose(np.sort(s["ttft"]), [0.1, 0.2, 0.3, 0.4])
    assert np.allclose(s["tpot"], [0.1, 0.1, 0.1])
    assert np.allclose(np.sort(s["itl"]), [0.1, 0.1, 0.2, 0.2, 0.3])  # gaps within each request, pooled
    ttft = stats_ms(s["ttft"])
    # linear interpolation between order statistics: p at rank (n - 1) * p / 100 of [100, 200, 300, 400]
    assert ttft["mean"] == pytest.approx(250) and ttft["p50"] == pytest.approx(250)
    assert ttft["p90"] == pytest.approx(370) and ttft["p99"] == pytest.approx(397)
    assert ttft["std"] == pytest.approx(np.sqrt(np.mean(np.square([-150, -50, 50, 150]))))
    assert stats_ms(np.zeros(0))["p99"] is None


def test_summary_throughput_goodput_and_errors():
    slo = Slo(ttft_ms=250, tpot_ms=100)  # 0 and 1 meet both; 2 and 3 miss TTFT; 4 failed
    got = summarize(RUN, slo)
    assert (got["requests"], got["completed"], got["failed"]) == (5, 4, 1)
    assert got["output_tokens"] == 10 + 4 + 18 + 1 and got["prompt_tokens"] == 40
    assert got["request_throughput"] == pytest.approx(4 / 4.0)
    assert got["output_throughput"] == pytest.approx(33 / 4.0)
    assert got["total_token_throughput"] == pytest.approx(73 / 4.0)
    assert got["goodput"] == pytest.approx(2 / 4.0)
    assert summarize(RUN, Slo(ttft_ms=1000))["goodput"] == pytest.approx(4 / 4.0)  # failed one never counts
    assert summarize(RUN, Slo(e2el_ms=600))["goodput"] == pytest.approx(2 / 4.0)  # 0.5 s and 0.4 s
    assert summarize(RUN)["goodput"] is None
    assert got["errors"] == {"NOT_FOUND": 1}
    assert got["tpot_ms"]["p50"] == pytest.approx(100)
    text = table(got)
    assert "NOT_FOUND × 1" in text and "TTFT" in text and "8.25" in text


def test_throughput_over_time_bins_tokens_at_their_chunks():
    starts, tokens, done = throughput_over_time(RUN, bin_s=1.0)
    assert list(starts) == [0.0, 1.0, 2.0, 3.0]
    # r0: 10 tokens over 3 chunks in [0, 1); r1: 4 over 3 in [1, 2); r2: 18 over 2 in [1, 2) and [2, 3); r3: 1 in [2, 3)
    assert np.allclose(tokens, [10, 4 + 9, 9 + 1, 0])
    assert np.allclose(done, [0, 2, 1, 1])  # ends (start + e2e): 1.0, 1.5, 3.5, 2.4


def test_json_file_and_compare_ratios(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    to_json(RUN, summarize(RUN, Slo(ttft_ms=250)), {"label": "a"}, a)
    half = RunRecord(RUN.results, duration_s=2.0)  # same requests in half the time
    to_json(half, summarize(half, Slo(ttft_ms=250)), {"label": "b"}, b)
    doc = json.loads(a.read_text())
    assert doc["config"] == {"label": "a"} and len(doc["requests"]) == 5
    assert doc["requests"][4]["error"] == "NOT_FOUND" and doc["requests"][0]["chunk_s"] == [0.1, 0.2, 0.4]
    rows = {key: ratio for key, _, _, ratio in ratios(doc["summary"], json.loads(b.read_text())["summary"])}
    assert rows["output_throughput"] == pytest.approx(2.0) and rows["goodput"] == pytest.approx(2.0)
    assert rows["ttft_ms.p50"] == pytest.approx(1.0) and rows["e2el_ms.mean"] == pytest.approx(1.0)
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "request_throughput" in out and "2.000" in out
    assert main(["bench", "--compare", str(a), str(tmp_path / "missing.json")]) == 2


def test_every_bench_flag_has_help():
    from nlora_serve.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = [a for a in sub.choices["bench"]._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 30 and all(a.help and len(a.help) > 10 for a in actions), \
        [a.option_strings for a in actions if not a.help]
