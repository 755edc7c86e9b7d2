"""uvicorn serving the OpenAI-compatible app inside the gRPC server's event loop (DESIGN §6).

Lifecycle, driven by :class:`~nlora_serve.serving.server.NloraServer`::

    http = HttpServer(app)
    port = http.bind("127.0.0.1", 0)   # StartupError names the port when it cannot be bound
    await http.start()                 # serving on that socket, in this loop
    ...
    await http.stop()                  # after the shared drain: close, cancel what is left

We bind the socket ourselves (uvicorn exits the process when it cannot bind) and keep uvicorn's
hands off SIGTERM/SIGINT: the serve command owns them and drains gRPC and HTTP together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import h11
import uvicorn
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from nlora_serve.errors import RefusalLog
from nlora_serve.serving.http_api.context import error_body
from nlora_serve.serving.http_api.forwarded import ForwardedFor
from nlora_serve.serving.server_config import StartupError

log = logging.getLogger("nlora_serve.http")
GRACEFUL_SHUTDOWN_S = 1.0  # after the drain, how long open HTTP requests may take before cancellation
MAX_BODY_BYTES = 16 << 20  # a request body at most: a 128k-token prompt as JSON ids is ~1 MB
HEAD_READ_SECONDS = 60.0  # a request line and headers at most this long after the connection (or its last response)
SEND_SECONDS = 60.0  # a response's writes stalled (the client reads nothing) at most this long: nginx's send_timeout


class BodyLimit:
    """ASGI wrapper: a request body over ``limit`` bytes is refused with 413 (Content-Length
    declared over it, or as soon as the bytes received pass it), so no request holds more."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = HTTPException(413, f"request body over {self.limit} bytes")
        seen = 0

        async def limited():
            nonlocal seen
            if declared.isdigit() and int(declared) > self.limit:
                raise too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        await self.app(scope, limited, send)


# uvicorn's warnings that a client's request alone causes, keyless: a request that is no HTTP (a TLS
# hello, garbage) and an upgrade to WebSocket (one line, then a second telling the operator to
# install a WebSocket library this server does not want); the second is dropped
_CLIENT_WARNINGS = {"Invalid HTTP request received.": "requests that are no valid HTTP/1.1 refused with 400",
                    "Unsupported upgrade request.": "upgrade requests (WebSocket) served as plain HTTP: this "
                                                    "server has no WebSocket endpoint"}
_DROPPED_WARNING = "No supported WebSocket library detected."


class _ClientErrorLog:
    """uvicorn's protocol logger ("uvicorn.error") with :data:`_CLIENT_WARNINGS` at most one INFO line
    per kind every 10 s (errors.RefusalLog): anyone could otherwise write one or two WARNING lines
    per request into the server's log (400 garbage or upgrade requests: 600 lines). The rest passes."""

    def __init__(self) -> None:
        # uvicorn's own logger stays at --log-level warning (uvicorn.Config sets it): the INFO lines go to ours
        self._logger, self._refusals = logging.getLogger("uvicorn.error"), RefusalLog(log)

    def warning(self, msg, *args, **kwargs) -> None:
        if msg in _CLIENT_WARNINGS:
            self._refusals.info(("client", msg), "HTTP API: %s", _CLIENT_WARNINGS[msg])
        elif not (isinstance(msg, str) and msg.startswith(_DROPPED_WARNING)):
            self._logger.warning(msg, *args, **kwargs)

    def send_timeout(self) -> None:
        """One INFO line every 10 s at most: a connection aborted by the send deadline (HeadDeadline)."""
        self._refusals.info(("client", "send_timeout"), "HTTP API: connections whose client read nothing of "
                            "its response for %g s aborted", SEND_SECONDS)

    def __getattr__(self, name: str):
        return getattr(self._logger, name)


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on the time a connection spends with no request of
    the app's: a connection that has not sent a whole request line and headers
    :data:`HEAD_READ_SECONDS` after it opened (or after its last response) gets 408 and is closed,
    as nginx's ``client_header_timeout`` (60 s) does; one still sending a body the app answered
    without reading (a 401, GET /health with a Content-Length) is closed that long after the
    response, as nginx bounds its lingering close.

    uvicorn times only the idle gap between requests (``timeout_keep_alive``, which any byte
    cancels), so a connection that never finished its headers, or trickled an unread body, was held
    for ever: no key is needed for either, and 3,000 such connections opened in 0.3 s were all still
    held after 70 s, each an open file of the server's (at its ``ulimit -n`` nothing else, adapter
    files included, could be opened). A body the app reads has its own deadline once the key is
    checked (generate.BODY_READ_SECONDS).

    And on the response: a connection whose client has read nothing of it for :data:`SEND_SECONDS`
    while the server has more to send (the transport's buffer over its high-water mark, uvicorn's
    ``send`` waiting for it to drain) is aborted, as nginx's ``send_timeout`` (60 s) closes it. uvicorn
    waited for ever: a client that stopped reading a stream (a hung process, a full pipe) held its
    request's places of ``--max-queue`` and of its tenant's quota, and the output queued for it, after
    the engine had finished it (a soak's stream of 8 echoed prompts' logprobs: ``nlora_requests_admitted``
    stayed at 8 with nothing running, until the client closed). Aborted, the connection is lost as a
    client's close is: the app sees the disconnect and the request ends, "cancelled".
    """

    client_errors = _ClientErrorLog()  # HttpServer gives each server its own

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.logger = self.client_errors
        self._deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes buffered when the send deadline was armed
        self._follow()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(False)
        self._stop_send_deadline()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._arm_send_deadline()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_send_deadline()

    def _arm_send_deadline(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self._send_deadline = self.loop.call_later(SEND_SECONDS, self._send_timed_out)

    def _stop_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_timed_out(self) -> None:
        """Still paused :data:`SEND_SECONDS` after the deadline was armed: a client that read some
        of it since gets another period (nginx's rule: between two successive writes), one that read
        nothing is aborted (``close`` would wait for the unread bytes to be flushed, for ever)."""
        self._send_deadline = None
        if self.transport.get_write_buffer_size() < self._unsent:
            self._arm_send_deadline()
            return
        self.client_errors.send_timeout()
        self.transport.abort()

    def _waiting_on_client(self) -> bool:
        """True while the app holds no request: no head yet, or its body unread after the response."""
        their, ours = self.conn.their_state, self.conn.our_state
        return their is h11.IDLE or (ours is h11.DONE and their is h11.SEND_BODY)

    def _follow(self) -> None:
        """Arm the deadline when the connection starts waiting on its client (a byte received meanwhile
        does not move it), cancel it when the app has a request."""
        self._set_deadline(self._waiting_on_client() and not self.transport.is_closing())

    def _set_deadline(self, on: bool) -> None:
        if on and self._deadline is None:
            self._deadline = self.loop.call_later(HEAD_READ_SECONDS, self._timed_out)
        elif not on and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._waiting_on_client():
            return
        if self.conn.their_state is h11.IDLE:  # nothing answered yet: say why
            body = json.dumps(error_body(f"the request line and headers did not arrive within {HEAD_READ_SECONDS:g} "
                                         "s of the connection or its last response", 408, code="head_timeout"))
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body.encode()))
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn.Server that installs no signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """One uvicorn server over an ASGI ``app`` on a socket bound by :meth:`bind`."""

    def __init__(self, app) -> None:
        self.app = BodyLimit(app)
        self.port: int | None = None  # the bound port, after bind()
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    def bind(self, host: str, port: int) -> int:
        """Bind and listen on ``host:port`` (0 = a free port); returns the port.

        Raises:
            StartupError: the address cannot be bound (the message names it and --http-port).
        """
        bare = host.strip("[]")
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT, as uvicorn does
            sock.bind((bare, port))
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot bind the HTTP port {host}:{port} (--http-port): "
                               f"{exc.strerror or exc}") from exc
        self._sock = sock
        self.port = sock.getsockname()[1]
        return self.port

    async def start(self) -> None:
        """Serve on the bound socket in the running loop; returns once uvicorn accepts connections.

        Raises:
            StartupError: uvicorn stopped while starting.
        """
        protocol = type("Protocol", (HeadDeadline,), {"client_errors": _ClientErrorLog()})
        config = uvicorn.Config(self.app, http=protocol, ws="none", lifespan="off", log_config=None,
                                log_level="warning", access_log=False, proxy_headers=False,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        # uvicorn's proxy_headers, but an X-Forwarded-For that is not an IP address is not taken (forwarded.py)
        config.app = ForwardedFor(self.app, config.forwarded_allow_ips)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="nlora-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its exception, if any
                raise StartupError(f"the HTTP server on port {self.port} stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, close idle connections, give open requests GRACEFUL_SHUTDOWN_S, cancel
        the rest (their engine requests are aborted). Idempotent."""
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None
        self.close()

    def close(self) -> None:
        """Release a socket that was bound but never served (no-op otherwise)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
