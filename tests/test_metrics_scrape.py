"""GET /metrics on the API port (no key) renders off the event loop, once for overlapping scrapes.

With --tenant-metrics a rendering is ~45 series per tenant: 4.2 MB and 0.4 s at 1,000 tenants
(measured on a loaded 2-core box); on the loop, where every tenant's streams run, 4 clients with no
key scraping in a loop made a stream's inter-token latency p50 288 ms -> 1,777 ms (p99 1.9 -> 7.5 s).
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from nlora_serve.serving import metrics_http, metrics_scrape
from nlora_serve.serving.http_api import routes
from nlora_serve.serving.metrics import ServerMetrics
from nlora_serve.serving.metrics_http import serve_metrics

RENDER_SECONDS = 0.3


class _SlowCollector:
    """A collector whose rendering holds its thread RENDER_SECONDS (as thousands of series do;
    sleeping, so that a loaded box's GIL does not decide whether the loop kept running)."""

    def __init__(self) -> None:
        self.renders = 0

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.renders += 1
        time.sleep(RENDER_SECONDS)
        return []


def _scrape_request(metrics: ServerMetrics) -> SimpleNamespace:
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(nlora=SimpleNamespace(metrics=metrics))))


def test_scrapes_run_off_the_event_loop_and_overlapping_ones_share_one_rendering(monkeypatch):
    monkeypatch.setattr(metrics_scrape, "REUSE_FACTOR", 1.0)  # a slow rendering answers for as long again
    monkeypatch.setattr(metrics_scrape, "REUSE_ABOVE_S", 0.0)  # whatever its CPU time (this one sleeps)
    stats = dict(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=0, preemptions=0)
    metrics = ServerMetrics(lambda: stats, lambda: (0, 0))
    slow = _SlowCollector()
    metrics.registry.register(slow)
    request = _scrape_request(metrics)

    async def main() -> tuple[float, list, int]:
        ticks = []

        async def tick() -> None:  # a stream's deltas: the loop must keep running while scrapes render
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.02)
        answers = await asyncio.gather(*(routes._metrics(request) for _ in range(4)))
        answers.append(await routes._metrics(request))  # right after: the same rendering
        await asyncio.sleep(0.03)  # the ticker's tick after a stall, if there was one
        ticker.cancel()
        renders = slow.renders
        reused_until = metrics.scrape._last[0]  # REUSE_FACTOR x its wall time after it ended
        await asyncio.sleep(max(0.0, reused_until - time.monotonic()) + 0.05)  # past it: a new rendering
        await routes._metrics(request)
        return max(b - a for a, b in zip(ticks, ticks[1:])), answers, renders

    worst_gap, answers, renders = asyncio.run(main())
    assert worst_gap < RENDER_SECONDS / 2, f"the event loop stalled {worst_gap:.3f} s behind a scrape"
    assert (renders, slow.renders) == (1, 2)
    assert all(a.status_code == 200 and b"nlora_requests_running 0.0" in a.body for a in answers)


@pytest.mark.parametrize("wait_s", [0.0, 0.1])
def test_a_rendering_fast_in_cpu_time_is_never_reused(wait_s):
    """A registry that renders in milliseconds (no --tenant-metrics, the tests' servers) answers each
    scrape afresh: a request counted between two scrapes shows in the second. CPU time decides, not
    wall time (``wait_s`` of sleeping in the rendering): a small registry on a loaded box (CI's, a busy
    server's) can wait 60 ms for the GIL, and a wall-time rule then served its stale counts for 0.6 s
    to the scrape a test makes right after the request it counts."""
    stats = dict(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=0, preemptions=0)
    metrics = ServerMetrics(lambda: stats, lambda: (0, 0))
    if wait_s:
        waiting = _SlowCollector()
        waiting.collect = lambda: time.sleep(wait_s) or []  # wall time, none of CPU
        metrics.registry.register(waiting)
    request = _scrape_request(metrics)

    async def main() -> tuple[bytes, bytes]:
        before = (await routes._metrics(request)).body
        metrics.reject("queue_full", "http")
        return before, (await routes._metrics(request)).body

    before, after = asyncio.run(main())
    line = b'nlora_requests_rejected_total{frontend="http",reason="queue_full"}'
    assert line + b" 0.0" in before and line + b" 1.0" in after


class _HeldCollector:
    """A collector whose rendering waits until ``release`` is set (counting renderings)."""

    def __init__(self) -> None:
        self.renders, self.release = 0, threading.Event()

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.renders += 1
        self.release.wait(10)
        return []


def test_overlapping_scrapes_of_the_metrics_port_share_one_rendering_in_their_format(monkeypatch):
    """--metrics-port rendered once per connection's thread: 8 keyless clients scraping at once
    were 8 renderings (1.4 s each at 45,000 series on a loaded box) holding the GIL by turns."""
    arrivals, shared_call = [], metrics_http._SharedMetrics.__call__

    def counted(self, environ, start_response):  # a scrape that reached the shared rendering
        arrivals.append(1)
        return shared_call(self, environ, start_response)

    monkeypatch.setattr(metrics_http._SharedMetrics, "__call__", counted)
    registry, held = CollectorRegistry(), _HeldCollector()
    registry.register(held)
    server = serve_metrics(registry, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    def scrape(headers: dict | None = None) -> tuple[str, bytes]:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as answer:
            return answer.headers.get("Content-Encoding"), answer.read()

    try:
        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(scrape) for _ in range(5)] + [pool.submit(scrape, {"Accept-Encoding": "gzip"})]
            # all six arrived and waiting on the first rendering (a fixed 0.5 s sleep: on a loaded box
            # a scrape that came later rendered again)
            deadline = time.monotonic() + 10
            while len(arrivals) < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)
            held.release.set()
            got = [a.result() for a in answers]
        assert held.renders == 2  # one per format: plain (5 scrapes), gzip (1)
        assert [encoding for encoding, _ in got] == [None] * 5 + ["gzip"]
        assert gzip.decompress(got[5][1]) == got[0][1]
        scrape()  # a fast rendering that ended before this scrape came: fresh
        assert held.renders == 3
    finally:
        held.release.set()
        server.shutdown()
        server.server_close()


def _call(app, method: str, environ_class: type = dict) -> tuple[str, list, bytes]:
    got = []
    environ = environ_class(REQUEST_METHOD=method, PATH_INFO="/metrics", QUERY_STRING="")
    body = b"".join(app(environ, lambda status, headers, exc_info=None: got.append((status, headers))))
    return got[-1][0], got[-1][1], body


def test_a_metrics_port_scrape_never_takes_the_answer_of_another_method():
    """The port's shared answers were keyed by headers and query string only: a GET that arrived
    while a POST, HEAD or OPTIONS of /metrics (no key needed) was answered took that answer, a 405
    or an empty 200, so a client sending those in a loop blanked Prometheus' scrapes."""
    registry = CollectorRegistry()
    Counter("nlora_probe", "a series every scrape must hold", registry=registry).inc()
    plain = make_wsgi_app(registry)
    in_post, get_arrived = threading.Event(), threading.Event()

    def gated(environ, start_response):  # the POST is answered only once the GET has arrived
        if environ["REQUEST_METHOD"] == "POST":
            in_post.set()
            get_arrived.wait(10)
        return plain(environ, start_response)

    class ArrivedEnviron(dict):  # the shared app reads the headers once the scrape has arrived
        def get(self, *args):
            get_arrived.set()
            return super().get(*args)

    shared = metrics_http._SharedMetrics(gated)
    with ThreadPoolExecutor(1) as pool:
        post = pool.submit(_call, shared, "POST")
        assert in_post.wait(10)
        status, _, body = _call(shared, "GET", ArrivedEnviron)
        assert post.result()[0].startswith("405")
    assert status == "200 OK" and b"nlora_probe_total 1.0" in body
    assert _call(shared, "OPTIONS")[0] == "200 OK" and _call(shared, "GET")[2] == body


def test_a_reused_metrics_port_answer_hands_each_scrape_its_own_headers(monkeypatch):
    """wsgiref's handler adds Content-Length to the header list it is given: the list of an answer
    shared between the port's threads was changed by one while another wrote it out."""
    monkeypatch.setattr(metrics_scrape, "REUSE_ABOVE_S", 0.0)  # every rendering reused a while
    shared = metrics_http._SharedMetrics(make_wsgi_app(CollectorRegistry()))

    def adding(environ, start_response):  # as wsgiref's set_content_length on the list it was given
        return shared(environ, lambda status, headers, exc_info=None: headers.append(("Content-Length", "1")))

    adding(dict(REQUEST_METHOD="GET", PATH_INFO="/metrics", QUERY_STRING=""), None)
    assert [name for name, _ in _call(shared, "GET")[1]] == ["Content-Type"]  # no Content-Length of the first


def test_metrics_port_answers_are_kept_per_negotiated_format_not_per_raw_header(monkeypatch):
    """The port's answers were keyed by the raw Accept string, 8 kept: a client cycling 9+ values
    (``text/html;q=0.1``, ``...;q=0.2``: all text 0.0.4) rendered afresh on each and pushed
    Prometheus' answer out. Keyed by the format prometheus_client negotiates, a few in all."""
    monkeypatch.setattr(metrics_http, "timed_rendering", lambda render: (render(), 0.0, float("inf")))
    renders, app = [], make_wsgi_app(CollectorRegistry())

    def counted(environ, start_response):
        renders.append(environ["HTTP_ACCEPT"])
        return app(environ, start_response)

    shared = metrics_http._SharedMetrics(counted)

    def scrape(accept: str = "", query: str = "") -> str:
        got = []
        environ = dict(REQUEST_METHOD="GET", PATH_INFO="/metrics", QUERY_STRING=query, HTTP_ACCEPT=accept)
        b"".join(shared(environ, lambda status, headers, exc_info=None: got.append(dict(headers))))
        return got[-1]["Content-Type"]

    plain = scrape()
    assert [scrape(f"text/html;q=0.{i}") for i in range(1, 10)] == [plain] * 9
    openmetrics = [scrape(f"application/openmetrics-text; version=1.{i}.0") for i in range(12)]
    assert set(openmetrics) == {"application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"}
    for i in range(12):  # filtered answers: the client picks the names; they push out none of the others
        scrape(query=f"name[]=n{i}")
    assert scrape("text/plain") == plain
    assert renders == ["", "application/openmetrics-text; version=1.0.0; escaping=underscores"] + [""] * 12
