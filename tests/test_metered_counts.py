"""When the token counters count: an engine request's prompt tokens, prefix-cache queries and hits
at its first token (or at its end when it ends before one), once per choice, as vLLM 0.32 counts
``vllm:prompt_tokens`` in the iteration that makes a request's first output, not when it finishes
(a minutes-long generation would otherwise show its prompt on the dashboards only at its end).

And, with per-tenant counters on (``serve --tenant-metrics``), how a request ended, once, for its
tenant (``nlora_tenant_requests_total``), with the tokens streamed to it
(``nlora_tenant_generation_tokens_total``); off, neither is in a scrape.

``Metered`` runs over hand-made deltas here, so every count is known by hand. Last, the
``--metrics-port`` endpoint that serves them closes a connection whose request does not arrive, and
answers /health with the server's state and any other path with a 404."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import pytest

from nlora_serve.engine.api import EngineError, RequestAborted, RequestOutput, RequestStream
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.health_state import health_answer
from nlora_serve.serving import metrics_http
from nlora_serve.serving.metrics import ServerMetrics
from nlora_serve.serving.stream import Metered

HTTP = {"frontend": "http"}
COUNTERS = ("nlora_prompt_tokens_total", "nlora_prefix_cache_queries_total", "nlora_prefix_cache_hits_total",
            "nlora_generation_tokens_total")


def _metrics(per_tenant: bool = False) -> ServerMetrics:
    return ServerMetrics(lambda: {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0,
                                  "preemptions": 0},
                         lambda: (0, 0), per_tenant=per_tenant)


def _counts(metrics: ServerMetrics) -> tuple[float, ...]:
    return tuple(metrics.registry.get_sample_value(name, HTTP) for name in COUNTERS)


def _delta(index: int, tokens: list[int], prompt: int, cached: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", "", tokens, finish, prompt, 0, cached_tokens=cached, index=index)


def _after_each(deltas: list[RequestOutput], n: int) -> tuple[list[tuple[float, ...]], ServerMetrics, Admission]:
    """The counters as seen right after each delta reaches the consumer of ``Metered``."""
    metrics, admission = _metrics(), Admission(max_queue=8)

    async def stream():
        for out in deltas:
            yield out

    async def consume():
        seen = []
        async for _ in Metered(stream(), metrics.request("http"), admission.reserve(), n):
            seen.append(_counts(metrics))
        return seen

    return asyncio.run(consume()), metrics, admission


def test_prompt_tokens_count_at_the_first_token_not_at_the_end():
    deltas = [_delta(0, [], 40, 32),  # a delta with no token yet (e.g. a stop-string hold): nothing
              _delta(0, [7], 40, 32), _delta(0, [8, 9], 40, 32), _delta(0, [10], 40, 32, "length")]
    seen, _, _ = _after_each(deltas, n=1)
    assert seen == [(0, 0, 0, 0), (40, 40, 32, 1), (40, 40, 32, 3), (40, 40, 32, 4)]


def test_each_choice_counts_its_prompt_once_and_one_that_ends_before_a_token_counts_at_its_end():
    deltas = [_delta(0, [1], 40, 0), _delta(1, [2], 40, 32), _delta(0, [3], 40, 0, "stop"),
              _delta(2, [], 40, 32, "abort"), _delta(1, [4], 40, 32, "length")]
    seen, metrics, _ = _after_each(deltas, n=3)
    assert seen == [(40, 40, 0, 1), (80, 80, 32, 2), (80, 80, 32, 3), (120, 120, 64, 3), (120, 120, 64, 4)]
    durations = metrics.registry.get_sample_value("nlora_request_duration_seconds_count", HTTP)
    assert durations == 1  # the request's duration once, at its last choice's end


def _ended(deltas: list, n: int = 1, tenant: str | None = "acme", take: int | None = None,
           per_tenant: bool = True) -> ServerMetrics:
    """``Metered`` over ``deltas`` (a delta, or an exception the engine stream raises there), its
    consumer stopping after ``take`` deltas (None: all); the metrics after it ended."""
    metrics, admission = _metrics(per_tenant), Admission(max_queue=8)

    async def stream():
        for out in deltas:
            if isinstance(out, Exception):
                raise out
            yield out

    async def consume():
        got = Metered(stream(), metrics.request("grpc", tenant), admission.reserve(), n)
        try:
            taken = 0
            async for _ in got:
                taken += 1
                if taken == take:
                    break
        finally:
            await got.aclose()

    try:
        asyncio.run(consume())
    except (RequestAborted, EngineError):
        pass
    assert admission.inflight == 0  # however it ended
    return metrics


def _tenant_counts(metrics: ServerMetrics) -> dict[tuple[str, str], float]:
    return {(s.labels["tenant"], s.labels["outcome"]): s.value for s in metrics.tenant_requests.collect()[0].samples
            if s.name.endswith("_total")}


def test_how_a_request_ended_is_counted_once_for_its_tenant_with_its_tokens():
    two = [_delta(0, [1], 4, 0), _delta(1, [2, 3], 4, 0, "stop"), _delta(0, [4], 4, 0, "length")]
    cases = {  # outcome: deltas, n, deltas taken, tokens streamed
        "finished": (two, 2, None, 4),
        "aborted": (two[:2] + [_delta(0, [], 4, 0, "abort")], 2, None, 3),  # one choice aborted without a reason
        "cancelled": (two, 2, 1, 1),  # the client went away after its first delta
    }
    for outcome, (deltas, n, take, streamed) in cases.items():
        metrics = _ended(deltas, n, take=take)
        assert _tenant_counts(metrics) == {("acme", outcome): 1}, outcome
        tokens = metrics.registry.get_sample_value("nlora_tenant_generation_tokens_total", {"tenant": "acme"})
        assert tokens == streamed, outcome
    raised = {"aborted": RequestAborted("adapter 'x' was unloaded (force)"), "error": EngineError("step failed")}
    for outcome, exc in raised.items():
        assert _tenant_counts(_ended([_delta(0, [1], 4, 0), exc])) == {("acme", outcome): 1}, outcome


def _ends(metrics: ServerMetrics) -> dict[tuple[str, str], float]:
    return {(s.labels["frontend"], s.labels["outcome"]): s.value for s in metrics.ended.collect()[0].samples
            if s.name.endswith("_total")}


def test_how_a_request_ended_is_counted_by_front_end_without_per_tenant_counters():
    """h99: an error or abort rate needed --tenant-metrics (a series per tenant, off by default):
    nlora_requests_ended_total{frontend, outcome} counts every admitted request's end, whoever sent it."""
    two = [_delta(0, [1], 4, 0), _delta(1, [2, 3], 4, 0, "stop"), _delta(0, [4], 4, 0, "length")]
    cases = {"finished": _ended(two, 2, per_tenant=False),
             "aborted": _ended(two[:2] + [_delta(0, [], 4, 0, "abort")], 2, per_tenant=False),
             "cancelled": _ended(two, 2, take=1, per_tenant=False),
             "error": _ended([_delta(0, [1], 4, 0), EngineError("step failed")], per_tenant=False)}
    for outcome, metrics in cases.items():
        ends = _ends(metrics)
        assert ends[("grpc", outcome)] == 1 and sum(ends.values()) == 1, (outcome, ends)
        assert set(ends) == {(f, o) for f in ("grpc", "http") for o in ("finished", "aborted", "cancelled", "error")}


def test_a_request_whose_key_was_not_checked_counts_for_no_tenant():
    metrics = _ended([_delta(0, [1], 4, 0, "stop")], tenant=None)
    assert _tenant_counts(metrics) == {}
    assert metrics.registry.get_sample_value("nlora_generation_tokens_total", {"frontend": "grpc"}) == 1
    metrics.reject("unauthenticated", "grpc")  # an unknown key: its reason only
    metrics.reject("queue_full", "http", "acme")
    assert _tenant_counts(metrics) == {("acme", "rejected"): 1}
    # and by reason: a tenant at its quota stands apart from its other refusals (one series before)
    metrics.reject("tenant_quota", "grpc", "acme")
    metrics.reject("tenant_quota", "http", "acme")
    metrics.reject("permission_denied", "http", "acme")
    by_reason = {(s.labels["tenant"], s.labels["reason"]): s.value
                 for family in metrics.registry.collect() if family.name == "nlora_tenant_requests_rejected"
                 for s in family.samples if s.name.endswith("_total")}
    assert by_reason == {("acme", "queue_full"): 1, ("acme", "tenant_quota"): 2, ("acme", "permission_denied"): 1}
    assert _tenant_counts(metrics) == {("acme", "rejected"): 4}


def test_without_per_tenant_counters_a_tenants_request_leaves_no_tenant_series():
    metrics = _ended([_delta(0, [1, 2], 4, 0, "stop")], per_tenant=False)
    metrics.reject("queue_full", "http", "acme")
    scraped = metrics.exposition()[0].decode()
    assert "nlora_tenant_" not in scraped  # not registered: no series and no HELP or TYPE line
    assert metrics.registry.get_sample_value("nlora_generation_tokens_total", {"frontend": "grpc"}) == 2
    assert metrics.registry.get_sample_value("nlora_requests_rejected_total",
                                             {"reason": "queue_full", "frontend": "http"}) == 1
    assert metrics.registry.get_sample_value("nlora_requests_rejected_total",  # a series from the start
                                             {"reason": "tenant_quota", "frontend": "http"}) == 0
    assert metrics.registry.get_sample_value("nlora_requests_rejected_total",
                                             {"reason": "tenant_queue_share", "frontend": "grpc"}) == 0


def _timed_requests(monkeypatch, per_tenant: bool) -> ServerMetrics:
    """Three requests on a hand-set clock (seconds): acme's over HTTP (first delta 0.25 s after its
    receipt, 2 tokens then 1 token 0.5 s apart, finished at 1.0 s) and over gRPC (first token at
    0.5 s, one more at 1.5 s, finished at 2.0 s), and beta's over gRPC, its key checked after its
    receipt (first token at 4.0 s, cancelled: no duration)."""
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    metrics = _metrics(per_tenant)

    def run(frontend, tenant, steps, finish_at=None, late_tenant=False):
        start = clock[0]
        timer = metrics.request(frontend, None if late_tenant else tenant)
        if late_tenant:
            timer.set_tenant(tenant)
        for at, count in steps:
            clock[0] = start + at
            timer.tokens(count)
        if finish_at is not None:
            clock[0] = start + finish_at
            timer.finish()
        timer.ended("finished" if finish_at is not None else "cancelled")

    run("http", "acme", [(0.25, 2), (0.75, 1)], finish_at=1.0)
    run("grpc", "acme", [(0.5, 1), (1.5, 1)], finish_at=2.0)
    run("grpc", "beta", [(4.0, 1)], late_tenant=True)
    return metrics


def test_each_tenant_has_its_own_latency_histograms_with_the_front_ends_observations(monkeypatch):
    """helper-148: one customer's latency was not in /metrics (TTFT and duration by front end only)."""
    metrics = _timed_requests(monkeypatch, per_tenant=True)
    value = metrics.registry.get_sample_value
    ttft, duration = "nlora_tenant_time_to_first_token_seconds", "nlora_tenant_request_duration_seconds"
    tpot = "nlora_tenant_request_time_per_output_token_seconds"
    acme, beta = {"tenant": "acme"}, {"tenant": "beta"}
    assert (value(f"{ttft}_count", acme), value(f"{ttft}_sum", acme)) == (2, 0.25 + 0.5)
    assert (value(f"{ttft}_count", beta), value(f"{ttft}_sum", beta)) == (1, 4.0)
    assert (value(f"{duration}_count", acme), value(f"{duration}_sum", acme)) == (2, 1.0 + 2.0)
    assert value(f"{duration}_count", beta) == 0  # cancelled: no duration, as the front ends' histogram
    # first delta to last over the tokens after the first delta's: 0.5 s / 1 and 1.0 s / 1
    assert (value(f"{tpot}_count", acme), value(f"{tpot}_sum", acme)) == (2, 0.5 + 1.0)
    assert value(f"{tpot}_count", beta) == 0
    assert value(f"{ttft}_bucket", {**acme, "le": "0.25"}) == 1 and value(f"{ttft}_bucket", {**acme, "le": "0.5"}) == 2
    # the front ends' own histograms hold the same observations, split by front end instead
    for name in ("time_to_first_token_seconds", "request_duration_seconds"):
        for suffix in ("count", "sum"):
            by_frontend = sum(value(f"nlora_{name}_{suffix}", {"frontend": f}) for f in ("grpc", "http"))
            by_tenant = sum(value(f"nlora_tenant_{name}_{suffix}", t) or 0 for t in (acme, beta))
            assert by_tenant == by_frontend, (name, suffix)
    buckets = {s.labels["le"] for f in metrics.registry.collect() if f.name == ttft
               for s in f.samples if s.name.endswith("_bucket")}
    front = {s.labels["le"] for f in metrics.registry.collect() if f.name == "nlora_time_to_first_token_seconds"
             for s in f.samples if s.name.endswith("_bucket")}
    assert buckets and buckets == front


def test_without_per_tenant_counters_the_latencies_go_to_the_front_ends_only(monkeypatch):
    metrics = _timed_requests(monkeypatch, per_tenant=False)
    assert "nlora_tenant_" not in metrics.exposition()[0].decode()
    value = metrics.registry.get_sample_value
    assert value("nlora_time_to_first_token_seconds_sum", {"frontend": "grpc"}) == 0.5 + 4.0
    assert value("nlora_request_duration_seconds_count", {"frontend": "http"}) == 1


def test_a_metered_stream_closed_before_its_first_delta_closes_the_engine_stream_and_releases_its_place():
    """A front end that gives up on a request before reading it (a client gone while the first delta
    was awaited, an error shaping the response) closes the metered stream unread: an async
    generator's aclose runs nothing before its first __anext__, which kept the request running and
    its admission place (the tenant's quota) held for good."""
    metrics, admission = _metrics(), Admission(max_queue=8)
    aborted: list[str] = []
    engine_stream = RequestStream("r", asyncio.Queue(), aborted.append)

    async def close_unread():
        deltas = Metered(engine_stream, metrics.request("http"), admission.reserve(), 1)
        assert admission.inflight == 1
        await deltas.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(deltas)

    asyncio.run(close_unread())
    assert (aborted, admission.inflight) == (["r"], 0)


def test_the_metrics_port_closes_a_connection_whose_request_does_not_arrive(monkeypatch):
    """prometheus_client's server read a request with no timeout: each idle connection (no key
    needed) held a thread of the serving process for as long as it stayed open."""
    monkeypatch.setattr(metrics_http, "READ_SECONDS", 0.3)
    metrics = _metrics()
    port = metrics.serve_http("127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as partial:
            partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
            assert (silent.recv(1), partial.recv(1)) == (b"", b"")  # closed, no answer
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as scrape:
            assert b"nlora_requests_running 0.0" in scrape.read()
    finally:
        metrics.close()


def test_the_metrics_port_serves_metrics_and_health_only():
    """prometheus_client's app answered every path with the metrics and a 200: a probe on
    ``--metrics-port``'s /health read 200 while the server drained. Now /health gives the server's
    state (health_state.py: 503 while draining) and any other path is a 404."""
    state = {"draining": False}
    metrics = _metrics()
    port = metrics.serve_http("127.0.0.1", 0, lambda: health_answer(None, state["draining"]))

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        assert get("/health") == (200, b'{"status": "ok"}')
        state["draining"] = True
        assert get("/health") == (503, b'{"status": "draining"}')
        status, body = get("/healthz")
        assert status == 404 and b"/metrics and /health" in body
        assert get("/")[0] == 404
        status, body = get("/metrics?name[]=nlora_requests_running")
        assert status == 200 and b"nlora_requests_running 0.0" in body
    finally:
        metrics.close()
    assert health_answer("step failed", True) == (503, {"status": "dead", "reason": "step failed"})
