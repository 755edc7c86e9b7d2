"""send_deadline.send_all on a bare grpc.aio server (no engine): a client that reads its stream
slowly, but a message at a time within the deadline, gets every message, however long the stream
takes. Its twin for a client that reads nothing, over a real Generate, is in
test_grpc_admission_before_tokenizing.py."""

from __future__ import annotations

import asyncio
import time

import grpc

from nlora_serve.serving.grpc_api import send_deadline
from nlora_serve.serving.grpc_api.send_deadline import send_all

MESSAGES, MESSAGE = 16, b"x" * 800  # one message fits the client's 1 KiB window, two do not
PAUSE = 0.06  # the client's pause after each message: well under the deadline, the stream's total well over it


async def _serve_slow_reader() -> tuple[int, float, bool]:
    """(messages the client read, seconds it took, whether the handler's response stream was closed)."""
    closed = asyncio.Event()

    async def responses():
        try:
            for _ in range(MESSAGES):
                yield MESSAGE
        finally:
            closed.set()

    async def handler(request, context):
        await send_all(responses(), context)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Stream", {"Read": grpc.unary_stream_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]  # a 1 KiB window
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            start, read = time.monotonic(), 0
            async for _ in channel.unary_stream("/test.Stream/Read")(b"", timeout=30):
                read += 1
                await asyncio.sleep(PAUSE)
            took = time.monotonic() - start
        await asyncio.wait_for(closed.wait(), 5)
        return read, took, closed.is_set()
    finally:
        await server.stop(0)


def test_a_client_that_reads_slowly_gets_its_whole_stream(monkeypatch):
    """Each message's write waits for the client's last read (its window holds one message); a
    deadline on the whole stream, or on anything but one write, would cut this client off."""
    monkeypatch.setattr(send_deadline, "SEND_SECONDS", 0.4)
    read, took, closed = asyncio.run(_serve_slow_reader())
    assert read == MESSAGES and closed
    assert took > 2 * send_deadline.SEND_SECONDS, took  # the stream outlasted the deadline
