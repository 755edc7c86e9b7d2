"""``nlora-serve bench`` against a real loopback gRPC server (16 requests, a few seconds): its JSON agrees
with the server's own Prometheus counters (requests, tokens, NOT_FOUND rejections)."""

from __future__ import annotations

import pytest

from bench_check import bench_json, scrape, seeded
from nlora_serve.client import NloraClient
from serving_check import CASES, TIED

TENANTS = ("acme", "beta", "gamma")


def test_bench_json_agrees_with_the_server_counters(make_server, tmp_path):
    server = make_server(metrics_port=0)
    port = server.server.metrics_port
    with NloraClient(server.target, timeout=60) as client:
        for name in TENANTS:
            client.upload_adapter(name, CASES / TIED)
    before, not_found_before = scrape(port), scrape(port, "not_found")
    doc = bench_json(tmp_path, "--server", server.target, "--tenants", ",".join((*TENANTS, "ghost")),
                     "--popularity", "round-robin", "--base-share", "0.2", "--prompt-len", "8:16",
                     "--output-len", "4:8", "--num-requests", "16", "--concurrency", "4", "--seed", "5")
    after, not_found_after = scrape(port), scrape(port, "not_found")
    summary, requests = doc["summary"], doc["requests"]
    ghosts = sum(r["tenant"] == "ghost" for r in requests)
    # seed 5: round-robin, the base model at request 10 (the workload tests check the draws themselves)
    assert [r["tenant"] for r in requests] == [r.tenant for r in seeded(16, (*TENANTS, "ghost"), 5)]
    assert ghosts == 4 and sum(r["tenant"] is None for r in requests) == 1 and summary["completed"] == 12
    assert summary["errors"] == {"NOT_FOUND": ghosts} and summary["failed"] == ghosts

    def grew(name: str) -> float:
        return after[name] - before[name]
    assert grew("nlora_request_duration_seconds_count") == summary["completed"]
    assert grew("nlora_time_to_first_token_seconds_count") == summary["completed"]
    assert grew("nlora_prompt_tokens_total") == summary["prompt_tokens"]
    assert grew("nlora_generation_tokens_total") == summary["output_tokens"]
    rejected = "nlora_requests_rejected_total"
    assert not_found_after[rejected] - not_found_before[rejected] == ghosts
    for r in requests:  # ignore_eos: every output has the asked length; prompts as drawn
        if r["error"] is None:
            assert 8 <= r["prompt_tokens"] <= 16 and 4 <= r["output_tokens"] <= 8
            assert r["ttft_s"] == pytest.approx(r["chunk_s"][0], abs=1e-6) and r["chunk_s"][-1] <= r["e2e_s"]
    assert summary["request_throughput"] * summary["duration_s"] == pytest.approx(summary["completed"])


def test_a_server_that_is_not_there_is_one_error_before_any_request(tmp_path, capsys, monkeypatch):
    # A newcomer's find: `bench --server` on a port with no server sent a request after request for
    # the whole --duration and reported "errors: UNAVAILABLE × 4990", as if the server were overloaded.
    import socket

    from nlora_serve.cli import main
    from nlora_serve.client.bench import targets

    monkeypatch.setattr(targets, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{s.getsockname()[1]}"
        out = tmp_path / "r.json"
        rc = main(["bench", "--server", server, "--duration", "30", "--no-progress", "--json", str(out)])
    assert rc == 2 and not out.exists()
    assert capsys.readouterr().err == (f"error: no gRPC server answers at {server} (waited 1 s): start one "
                                       "(nlora-serve serve) or give --server HOST:PORT, its gRPC port (serve "
                                       "--port, 50051 by default), not its --http-port\n")
