"""``--metrics-port``: Prometheus' ``/metrics`` on a port of its own, served from a thread per
connection as prometheus_client's ``start_http_server`` serves it, with a deadline on each request.

prometheus_client's server reads a request with no timeout, so a connection that sends nothing (or
half a request line) held its thread for as long as it stayed open: 2,000 idle connections, which
need no key, were 2,000 threads of the serving process, all still there later, and at the process's
thread limit nothing else in it (the engine's workers, grpc's) could start one. Here a request's
line and headers must arrive within :data:`READ_SECONDS` of the connection, however they trickle
in; then the connection is closed and its thread ends.

Scrapes that overlap share one rendering (:class:`_SharedMetrics`), as the API port's do
(metrics_scrape.py): each connection's thread rendered its own, so N keyless clients scraping at once
were N renderings of every tenant's series competing for the GIL with the engine's step thread.

Only ``/metrics`` (and ``/health``, where the server gives its state: health_state.py) are served;
any other path is a 404. prometheus_client's app answers every path with the metrics and a 200, so
a probe pointed at ``--metrics-port``'s ``/health`` read 200 while the server drained or its engine
was dead.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable

from urllib.parse import parse_qs, urlencode

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import (CONTENT_TYPE_PLAIN_0_0_4, ThreadingWSGIServer, choose_encoder,
                                          gzip_accepted)
from prometheus_client.utils import parse_version
from wsgiref.simple_server import WSGIRequestHandler, make_server

from nlora_serve.serving.metrics_scrape import timed_rendering

READ_SECONDS = 10.0  # a request's line and headers at most this long after the connection (Prometheus' scrape timeout)


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each given only the time left until ``deadline`` (time.monotonic())."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(WSGIRequestHandler):
    """One request per connection, read before its deadline; logs nothing (as prometheus_client's)."""

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + READ_SECONDS))

    def handle(self) -> None:
        try:
            super().handle()
        except TimeoutError:  # too slow: closed without an answer, as an idle keep-alive connection is
            pass

    def log_message(self, format, *args) -> None:
        pass


def negotiated(environ) -> tuple[str, bool, tuple[str, ...]]:
    """The format a GET of ``/metrics`` is answered in, as prometheus_client negotiates it, in a
    canonical form: (an ``Accept`` value asking for exactly that format, gzip or not, the
    ``name[]`` filter sorted). The ``Accept`` value is one of a fixed few, whatever the client sent:
    ``""`` (text 0.0.4), ``text/plain; version=1.0.0; escaping=E``, ``application/openmetrics-text``
    (its 1.0.0) or ``application/openmetrics-text; version=V; escaping=E``, with ``V`` 1.0.0 or
    2.0.0 (what prometheus_client's rendering tells apart: native histograms from 2.0.0; the answer's
    Content-Type names that version, not the one asked) and ``E`` one of its 4 escapings. An
    ``Accept`` prometheus_client cannot parse (``version=1.x``: a TypeError in its app, a 500) gets
    text 0.0.4."""
    try:
        content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))[1]
    except (TypeError, ValueError):
        content_type = CONTENT_TYPE_PLAIN_0_0_4
    kind, *params = (part.strip() for part in content_type.split(";"))
    said = dict(param.split("=", 1) for param in params if "=" in param)
    if kind == "application/openmetrics-text" and "escaping" not in said:
        accept = kind
    elif kind == "application/openmetrics-text":
        # its first part a number >= 1: choose_encoder compared it with (1, 0, 0) without a TypeError
        version = "2.0.0" if parse_version(said.get("version", "1.0.0"))[0] >= 2 else "1.0.0"
        accept = f"{kind}; version={version}; escaping={said['escaping']}"
    elif "escaping" in said:
        accept = f"text/plain; version=1.0.0; escaping={said['escaping']}"
    else:
        accept = ""
    names = tuple(sorted(set(parse_qs(environ.get("QUERY_STRING", "")).get("name[]", []))))
    return accept, gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")), names


class _SharedMetrics:
    """prometheus_client's ``/metrics`` WSGI app, one rendering at a time: a scrape that waited for
    another's rendering takes its answer when it has the same format (:func:`negotiated`:
    OpenMetrics or text, its version and escaping, gzip, ``name[]``), and so does one while a slow
    rendering's answer is reused (metrics_scrape.timed_rendering's rule, the API port's too). Answers
    are kept per format: the formats without ``name[]`` are a fixed few (28) and all kept, so a
    client cycling ``Accept`` values can neither force a fresh rendering per value nor push
    Prometheus' answer out (keyed by the raw headers, 9 distinct values did both); the filtered ones,
    whose names the client picks, the last :data:`MAX_FILTERED`. Only a GET renders and shares:
    another method's answer (OPTIONS' empty 200, a POST's or HEAD's 405) is the app's own, never
    handed to a GET that waited (a client with no key sending those in a loop blanked Prometheus'
    scrapes). Each answer gets a copy of its header list (wsgiref adds Content-Length to it).
    Thread-safe."""

    MAX_FILTERED = 8  # answers kept for name[]-filtered formats (the client picks the names: bounded)

    def __init__(self, app) -> None:
        self._app, self._lock = app, threading.Lock()
        self._answers: dict[tuple, tuple[float, float, str, list, bytes]] = {}  # format -> (ended, reused until, ...)
        self._filtered: dict[tuple, tuple[float, float, str, list, bytes]] = {}

    def __call__(self, environ, start_response):
        arrived = time.monotonic()
        if environ.get("REQUEST_METHOD") != "GET":  # nothing rendered: answered apart
            return self._app(environ, start_response)
        key = negotiated(environ)
        answers = self._filtered if key[2] else self._answers
        with self._lock:  # a scrape arriving while one renders waits here, then takes its answer
            answer = answers.get(key)
            if answer is None or (answer[0] < arrived and time.monotonic() >= answer[1]):
                answer = answers[key] = self._render(environ, key)
                while len(self._filtered) > self.MAX_FILTERED:
                    del self._filtered[next(iter(self._filtered))]
        start_response(answer[2], list(answer[3]))  # its own: the handler adds to it as it writes
        return [answer[4]]

    def _render(self, environ, key: tuple[str, bool, tuple[str, ...]]) -> tuple[float, float, str, list, bytes]:
        """The app's answer in ``key``'s format (the request's headers replaced by the canonical ones)."""
        accept, gzipped, names = key
        environ = dict(environ, HTTP_ACCEPT=accept, HTTP_ACCEPT_ENCODING="gzip" if gzipped else "",
                       QUERY_STRING=urlencode([("name[]", name) for name in names]))
        got = []
        body, end, reused_until = timed_rendering(lambda: b"".join(
            self._app(environ, lambda status, headers, exc_info=None: got.append((status, headers)))))
        return end, reused_until, *got[-1], body


def _app(registry: CollectorRegistry, health: Callable[[], tuple[int, dict]] | None):
    """The WSGI app: ``/metrics`` from ``registry`` (:class:`_SharedMetrics`), ``/health`` from
    ``health`` ((status, JSON body); None: a 404 as any other path), anything else a 404 naming the
    paths served."""
    metrics = _SharedMetrics(make_wsgi_app(registry))
    served = "/metrics and /health" if health is not None else "/metrics"

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/health" and health is not None:
            status, body = health()
            reason = "OK" if status == 200 else "Service Unavailable"
            text, kind = json.dumps(body).encode(), "application/json"
        else:
            status, reason, kind = 404, "Not Found", "text/plain; charset=utf-8"
            text = f"not found: this port (--metrics-port) serves {served} only\n".encode()
        start_response(f"{status} {reason}", [("Content-Type", kind), ("Content-Length", str(len(text)))])
        return [text]

    return app


def serve_metrics(registry: CollectorRegistry, host: str, port: int,
                  health: Callable[[], tuple[int, dict]] | None = None) -> ThreadingWSGIServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (0 = a free port) from a daemon thread, and
    ``health()``'s (HTTP status, JSON body) at ``/health`` where given (called from that thread);
    any other path is a 404. Returns the server (``server_port``; ``shutdown()`` and
    ``server_close()`` stop it).

    Raises:
        OSError: the address cannot be bound.
    """
    # the address family of the host, as prometheus_client's start_http_server picks it
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server = make_server(sockaddr[0], port, _app(registry, health), server_class, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="nlora-metrics", daemon=True).start()
    return server
