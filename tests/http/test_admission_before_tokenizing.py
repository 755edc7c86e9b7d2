"""The queue bound and a tenant's quota are decided before its prompt is tokenized (a
hostile review, h39): tenant C (max_concurrent_requests 2) sent 40 requests at once, each a ~660 KB
prompt (0.45 s to tokenize) with a 14 MB ``user`` field; all 40 waited for the tokenizer, server
RSS rose 2.8 -> 4.6 GB and all were refused only after tokenizing. Now each request reserves its
place before tokenizing: over the quota or the queue it is a 429 at once, and the place is given
back however the request ends (a refused prompt, the client gone while it waited)."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from admission_harness import (CAPPED_KEY, FREE_KEY, HOLD, MAX_QUEUE, OTHER_KEY, QUOTA, HeldTokenizer,
                               admission_counts, wait_for, write_quota_tenants)
from grpc_harness import server_factory, stop_all
from http_harness import base_url, headers_only, read_response
from nlora_serve.serving.http_api import generate as http_generate
from nlora_serve.serving.http_api import server as http_server_module
from nlora_serve.engine.api import max_prompt_bytes

@pytest.fixture(scope="module")
def server(base_fp32, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("admit")
    make, running = server_factory(base_fp32, tokenizer, root)
    yield make(write_quota_tenants(root / "tenants.json"), http_port=0, max_queue=MAX_QUEUE, tenant_metrics=True)
    stop_all(running)


def _complete(server, key: str, prompt, max_tokens: int = 1) -> tuple[int, dict]:
    body = {"model": server.server.generation.info.model, "prompt": prompt, "max_tokens": max_tokens}
    reply = requests.post(f"{base_url(server)}/completions", data=json.dumps(body), timeout=60,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return reply.status_code, reply.json()


def _idle(server) -> bool:
    return wait_for(lambda: admission_counts(server) == (0, {}) and server.engine.stats()["running"] == 0)


def _burst_while_held(server, monkeypatch, key: str, count: int, refusals: int
                      ) -> tuple[list, list[str], HeldTokenizer, tuple]:
    """``count`` concurrent requests of ``key`` while another tenant's prompt holds the tokenizer
    thread, ``refusals`` of them expected to be refused; (their (status, body) in order, their
    prompts, the tokenizer, the admission counts once the refusals were all answered, before the
    thread was released)."""
    held = HeldTokenizer(server.engine.tokenizer, monkeypatch)
    prompts = [f"burst prompt {i}" for i in range(count)]
    with concurrent.futures.ThreadPoolExecutor(count + 1) as pool:
        try:
            blocker = pool.submit(_complete, server, OTHER_KEY, HOLD)
            assert held.busy.wait(30), "the blocking prompt never reached the tokenizer"
            burst = [pool.submit(_complete, server, key, prompt) for prompt in prompts]
            # every refusal comes back while the tokenizer thread is still held: before tokenizing
            assert wait_for(lambda: sum(f.done() for f in burst) >= refusals, within=20), \
                "over-quota requests were not refused while the tokenizer was busy"
            counts = admission_counts(server)
        finally:
            held.release.set()
        assert blocker.result()[0] == 200
        return [f.result() for f in burst], prompts, held, counts


def test_over_its_quota_a_tenant_is_refused_429_before_tokenizing(server, monkeypatch):
    results, prompts, held, counts = _burst_while_held(server, monkeypatch, CAPPED_KEY, 5, 3)
    assert sorted(status for status, _ in results) == [200] * QUOTA + [429] * 3, results
    assert counts == (1 + QUOTA, {"other-co": 1, "capped-co": QUOTA})  # the refused were never counted
    for status, body in results:
        if status == 429:
            assert body["error"]["code"] == "tenant_quota"  # its own cap, not a full queue (h99)
            assert "max_concurrent_requests" in body["error"]["message"]
    admitted = {prompt for (status, _), prompt in zip(results, prompts) if status == 200}
    assert sorted(held.seen) == sorted([HOLD, *admitted])  # the refused prompts were never tokenized
    assert _idle(server)


def test_over_the_max_queue_requests_are_refused_429_before_tokenizing(server, monkeypatch):
    # the blocker holds one place of MAX_QUEUE 4, free-co (no quota, no queue shares) takes the other 3
    results, prompts, held, counts = _burst_while_held(server, monkeypatch, FREE_KEY, MAX_QUEUE + 1, 2)
    assert sorted(status for status, _ in results) == [200] * (MAX_QUEUE - 1) + [429] * 2, results
    assert counts == (MAX_QUEUE, {"other-co": 1, "free-co": MAX_QUEUE - 1})
    # the server's bound is not told: beside "full", minus the caller's count, it is the others' count
    assert all(body["error"]["message"] == "server queue is full (the server is busy); retry with backoff"
               for status, body in results if status == 429)
    admitted = {prompt for (status, _), prompt in zip(results, prompts) if status == 200}
    assert sorted(held.seen) == sorted([HOLD, *admitted])
    assert _idle(server)


@pytest.mark.parametrize("prompt, max_tokens, words", [
    ("\ud800", 1, "surrogate"),  # text no tokenizer takes: refused on the tokenizer thread
    (None, 1, "refused before tokenizing"),  # over the prompt byte bound (max_prompt_bytes)
    ([1] + [30] * 1023, 100, "maximum context length is 1024"),  # no room to generate: refused after tokenizing
])
def test_a_prompt_refused_after_reserving_gives_its_place_back(server, prompt, max_tokens, words):
    if prompt is None:
        prompt = "x" * (max_prompt_bytes(server.engine.tokenizer, server.engine.max_model_len) + 1)
    for _ in range(QUOTA + 1):  # more refusals than the quota: a leaked place would turn the last into a 429
        status, body = _complete(server, CAPPED_KEY, prompt, max_tokens)
        assert (status, body["error"]["code"]) == (400, "invalid_argument"), body
        assert words in body["error"]["message"]
    assert admission_counts(server) == (0, {})
    assert [_complete(server, CAPPED_KEY, "Hi")[0] for _ in range(QUOTA + 1)] == [200] * (QUOTA + 1)
    assert _idle(server)


def test_a_client_gone_while_waiting_for_the_tokenizer_gives_its_place_back(server, monkeypatch):
    held = HeldTokenizer(server.engine.tokenizer, monkeypatch)
    body = json.dumps({"model": server.server.generation.info.model, "prompt": "gone prompt", "max_tokens": 1})
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CAPPED_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            blocker = pool.submit(_complete, server, OTHER_KEY, HOLD)
            assert held.busy.wait(30)
            with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
                sock.sendall((head + body).encode())
                assert wait_for(lambda: admission_counts(server)[1].get("capped-co") == 1), admission_counts(server)
            # closed while its prompt waits behind the held thread: its place is given back at once
            assert wait_for(lambda: admission_counts(server) == (1, {"other-co": 1})), admission_counts(server)
            assert not held.release.is_set()
        finally:
            held.release.set()
        assert blocker.result()[0] == 200
    assert held.seen == [HOLD]  # the gone request's prompt was never tokenized
    assert _idle(server)


def test_over_its_quota_a_request_is_refused_before_its_body_is_read(server):
    # two requests hold capped-co's quota while their (up to 16 MiB) bodies are still on the way:
    # a third is refused at once and its body is never read; the held ones, gone mid-body, give
    # their places back
    before = _tenant_counts(server, "capped-co")
    holding = [headers_only(server, CAPPED_KEY, 15 << 20) for _ in range(QUOTA)]
    try:
        assert wait_for(lambda: admission_counts(server) == (QUOTA, {"capped-co": QUOTA})), admission_counts(server)
        # what an operator sees: admitted, but neither running nor waiting in the engine yet
        assert [_sample(server, f"nlora_requests_{g}") for g in ("admitted", "running", "waiting")] == [QUOTA, 0, 0]
        with headers_only(server, CAPPED_KEY, 15 << 20) as third:
            reply = read_response(third)
        assert reply.startswith(b"HTTP/1.1 429 "), reply[:200]
        assert b"max_concurrent_requests" in reply
    finally:
        for sock in holding:
            sock.close()
    assert wait_for(lambda: admission_counts(server) == (0, {})), admission_counts(server)
    assert _complete(server, CAPPED_KEY, "Hi")[0] == 200
    # capped-co's requests by how they ended: the two gone mid-body, the one over its quota, the last
    after = _tenant_counts(server, "capped-co")
    assert {k: moved for k in after if (moved := after[k] - before.get(k, 0))} == {"cancelled": 2, "rejected": 1,
                                                                                   "finished": 1}


def _tenant_counts(server, tenant: str) -> dict[str, float]:
    """nlora_tenant_requests_total of ``tenant``, by outcome."""
    return {s.labels["outcome"]: s.value for s in server.server.metrics.tenant_requests.collect()[0].samples
            if s.name.endswith("_total") and s.labels["tenant"] == tenant}


def test_a_body_held_back_past_the_deadline_is_408_and_gives_its_place_back(server, monkeypatch):
    # the reservation is taken before the body is read, so a body that never comes must not hold
    # the tenant's quota for ever
    monkeypatch.setattr(http_generate, "BODY_READ_SECONDS", 0.5)
    before = _timeouts(server)
    with headers_only(server, CAPPED_KEY, 100) as held:
        assert wait_for(lambda: admission_counts(server) == (1, {"capped-co": 1})), admission_counts(server)
        reply = read_response(held)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_timeout" and "did not arrive within 0.5 s" in error["message"]
    assert wait_for(lambda: admission_counts(server) == (0, {})), admission_counts(server)
    assert _timeouts(server) == before + 1
    assert _complete(server, CAPPED_KEY, "Hi")[0] == 200


def test_a_connection_without_a_whole_request_head_or_trickling_an_unread_body_is_closed(server, monkeypatch):
    """uvicorn held a connection that never finished its headers, or kept sending a body the app
    answered without reading, for ever (no key is needed for either): 3,000 of them, each an open
    file of the server's, were all still held after 70 s."""
    monkeypatch.setattr(http_server_module, "HEAD_READ_SECONDS", 0.3)
    port = server.server.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as partial, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as kept, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as trickling:
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(kept).endswith(b'{"status":"ok"}')
        kept.sendall(b"GET /health HTTP/1.1\r\n")  # its next request's head, cut short
        trickling.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
        assert read_response(trickling).startswith(b"HTTP/1.1 401 ")  # refused before its body is read
        trickling.sendall(b"{")  # a byte of that body: uvicorn's keep-alive timer ends at each one
        for sock in (silent, partial, kept):
            reply = read_response(sock)
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
            error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
            assert (error["code"], error["message"]) == ("head_timeout", "the request line and headers did not "
                                                         "arrive within 0.3 s of the connection or its last response")
        for sock in (silent, partial, kept, trickling):
            assert sock.recv(1) == b""  # closed
    assert _complete(server, FREE_KEY, "Hi")[0] == 200


def test_requests_that_are_no_http_or_upgrades_write_one_log_line_each_kind_not_one_each(server, caplog):
    """uvicorn wrote a WARNING per request that is no HTTP, and two per WebSocket upgrade (the second
    asking the operator to install a WebSocket library): 400 such keyless requests were 600 lines."""
    caplog.set_level(logging.INFO)
    for request in [b"\x16\x03\x01 no http\r\n\r\n"] * 3 + [b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                                         b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"] * 3:
        with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
            sock.sendall(request)
            assert sock.recv(12) in (b"HTTP/1.1 400", b"HTTP/1.1 200")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name in ("uvicorn.error", "nlora_serve.http")]
    assert lines == [("INFO", "HTTP API: requests that are no valid HTTP/1.1 refused with 400"),
                     ("INFO", "HTTP API: upgrade requests (WebSocket) served as plain HTTP: this server has no "
                              "WebSocket endpoint")]


def _timeouts(server) -> float:
    """nlora_requests_rejected_total{reason="body_timeout", frontend="http"}."""
    return _sample(server, "nlora_requests_rejected_total", {"reason": "body_timeout", "frontend": "http"})


def _sample(server, name: str, labels: dict | None = None) -> float:
    """One sample of the HTTP port's /metrics."""
    text = requests.get(f"http://127.0.0.1:{server.server.http_port}/metrics", timeout=10).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == name and s.labels == (labels or {}))
