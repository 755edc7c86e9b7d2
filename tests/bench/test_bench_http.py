"""The bench's OpenAI target against our own server's HTTP port (``serve --http-port``) for a few
requests: its JSON agrees with the server's Prometheus counters, as the gRPC run's does."""

from __future__ import annotations

import pytest

from bench_check import bench_json, scrape, seeded
from nlora_serve.client import NloraClient
from serving_check import CASES, TIED

TENANTS = ("acme", "beta")


def test_openai_target_on_our_http_port_agrees_with_the_server_counters(make_server, tmp_path):
    server = make_server(metrics_port=0, http_port=0)
    port = server.server.metrics_port
    with NloraClient(server.target, timeout=60) as client:
        for name in TENANTS:
            client.upload_adapter(name, CASES / TIED)
    before, not_found_before = scrape(port), scrape(port, "not_found")
    doc = bench_json(tmp_path, "--target", "openai", "--base-url", f"http://127.0.0.1:{server.server.http_port}",
                     "--tenants", ",".join((*TENANTS, "ghost")), "--popularity", "round-robin",
                     "--base-share", "0.2", "--prompt-len", "8:16", "--output-len", "4:8", "--num-requests", "12",
                     "--concurrency", "4", "--seed", "6")
    after, not_found_after = scrape(port), scrape(port, "not_found")
    summary, requests = doc["summary"], doc["requests"]
    ghosts = sum(r["tenant"] == "ghost" for r in requests)
    assert [r["tenant"] for r in requests] == [r.tenant for r in seeded(12, (*TENANTS, "ghost"), 6)]
    assert ghosts == 4 and sum(r["tenant"] is None for r in requests) == 2 and summary["completed"] == 8
    assert summary["errors"] == {"HTTP 404 not_found": ghosts}  # the error object's code: our reason
    for name, key in (("nlora_request_duration_seconds_count", "completed"),
                      ("nlora_prompt_tokens_total", "prompt_tokens"),
                      ("nlora_generation_tokens_total", "output_tokens")):
        assert after[name] - before[name] == summary[key], name
    rejected = "nlora_requests_rejected_total"
    assert not_found_after[rejected] - not_found_before[rejected] == ghosts
    for r in requests:
        if r["error"] is None:  # ignore_eos honoured; usage reported; one chunk per streamed piece
            assert 8 <= r["prompt_tokens"] <= 16 and 4 <= r["output_tokens"] <= 8
            assert r["ttft_s"] == pytest.approx(r["chunk_s"][0], abs=1e-6)
