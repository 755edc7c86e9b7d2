"""A client that stops reading its response (a hung process; or one that closed its socket while
the server's writes were paused: the server half-closes and waits for the unread bytes to flush)
must not hold the request for ever: its connection is aborted SEND_SECONDS after the last byte it
took (http_api/server.py's HeadDeadline, nginx's send_timeout), as a client's close ends it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from nlora_serve.serving.http_api import server as http_server_module
from nlora_serve.serving.http_api.server import HttpServer

CHUNK = b"x" * (1 << 16)  # uvicorn's transport pauses past 64 KiB buffered


def _stream_app(chunks: int, ended: dict):
    """An ASGI app streaming ``chunks`` chunks of 64 KiB; ``ended["at"]`` is set once its send loop
    is over (uvicorn's ``send`` waits while the transport is paused, and returns at once once the
    connection is lost)."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        ended["at"] = time.monotonic()

    return app


async def _serve(chunks: int, client, seconds: float) -> tuple[float | None, object]:
    """Serve the app to ``client(port)``; (seconds until the app's send loop ended, None if not
    within ``seconds``; what ``client`` returned)."""
    ended: dict = {}
    server = HttpServer(_stream_app(chunks, ended))
    port = server.bind("127.0.0.1", 0)
    # accepted sockets inherit it: a small send buffer, not autotuned (to 4 MiB), so a few chunks fill it
    server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await server.start()
    try:
        start = time.monotonic()
        sock, result = client(port)
        while time.monotonic() - start < seconds and ("at" not in ended or (result is not None and result.is_alive())):
            await asyncio.sleep(0.05)
        sock.close()
        return (ended["at"] - start if "at" in ended else None), result
    finally:
        await server.stop()


def _request(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def test_a_client_that_reads_nothing_is_aborted_after_the_send_deadline(monkeypatch):
    monkeypatch.setattr(http_server_module, "SEND_SECONDS", 0.5)
    took, _ = asyncio.run(_serve(64, lambda port: (_request(port, rcvbuf=4096), None), seconds=8.0))
    # before: uvicorn's send waited for the buffer to drain for ever
    assert took is not None, "the response to a client that reads nothing was still being sent after 8 s"
    assert took < 4.0, took


def test_a_client_that_reads_slowly_gets_its_whole_response(monkeypatch):
    """Any progress re-arms the deadline (nginx's rule: between two successive writes): a deadline
    on one pause would cut this client off: each of its pauses (64 KiB at ~400 KiB/s) outlasts it."""
    monkeypatch.setattr(http_server_module, "SEND_SECONDS", 0.1)
    chunks, got = 8, [0]

    def reading(port: int):
        sock = _request(port, rcvbuf=4096)

        def drain():
            tail = b""
            while data := sock.recv(4096):
                got[0] += len(data)
                tail = (tail + data)[-5:]
                if tail == b"0\r\n\r\n":  # the chunked body's end
                    return
                time.sleep(0.01)  # ~400 KiB/s at most
        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        return sock, thread

    took, thread = asyncio.run(_serve(chunks, reading, seconds=20.0))
    thread.join(5)
    assert took is not None and got[0] >= chunks * len(CHUNK), (took, got)
