"""A server stream's writes held to a deadline: a client that reads nothing of its stream for
:data:`SEND_SECONDS` loses the call, as HTTP's (http_api/server.py's HeadDeadline, nginx's
``send_timeout``).

grpc.aio's write of a message completes once HTTP/2 flow control lets the message out: a client
that stops reading (a hung process, an application that never iterates its call) leaves its
stream's window full and the server's write waiting for ever (gRPC's keepalive does not help: a
client's transport answers pings whether its application reads or not). Generate's handler then
held its request's places in ``--max-queue`` and its tenant's quota (``nlora_requests_admitted``)
after the engine had finished it: measured with a client whose window was 1 KiB
(``grpc.http2.lookahead_bytes`` 1024, ``grpc.http2.bdp_probe`` 0) and a 77 KB first response
(prompt logprobs), until the client read (tests/grpc/test_grpc_admission_before_tokenizing.py).

Progress is a whole message taken: the deadline runs from the start of each write (and of the
response headers) to its end, so a slow reader that takes a message within :data:`SEND_SECONDS` of
the last is served to the end, however long the stream takes. A single message a client takes more
than :data:`SEND_SECONDS` to read (a first response with prompt logprobs of a long prompt, a few MB
at most, read at under 1/60 of its size a second) is cut too.

A stalled call ends as a client's cancel ends it: the handler's response stream is closed (the
engine request aborted, its admission released, its end counted ``cancelled``), and the call gets
DEADLINE_EXCEEDED with the reason ``send_timeout`` in the trailing metadata, which the client sees
once it reads what was queued before it. grpc.aio cannot cancel a server's call; the status is
queued behind the stalled message, and the call's last bytes are freed when the client reads or
its connection closes (a server's shutdown cancels it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from nlora_serve.errors import RefusalLog
from nlora_serve.serving.status import abort

log = logging.getLogger(__name__)

SEND_SECONDS = 60.0  # one message's write stalled (the client reads nothing) at most this long: nginx's send_timeout
SEND_TIMEOUT = "send_timeout"  # the reason in the trailing metadata (status.REASON_KEY)
_lines = RefusalLog(log)  # one line every 10 s at most, with a count of those left out


class SendStalled(Exception):
    """A write did not complete within :data:`SEND_SECONDS`."""


class _WriteDeadline:
    """Cancels the running task when a write it awaits has not completed within :data:`SEND_SECONDS`
    (a timer per write: ``asyncio.wait_for`` would start a task per message; ``asyncio.timeout`` is
    Python 3.11+)."""

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._expired = False

    async def run(self, write) -> None:
        """Await ``write`` (an awaitable) under the deadline.

        Raises:
            SendStalled: it did not complete within :data:`SEND_SECONDS` (and was cancelled).
        """
        timer = self._loop.call_later(SEND_SECONDS, self._expire)
        try:
            await write
        except asyncio.CancelledError:
            if not self._expired:
                raise  # the call's own cancel (client gone, deadline, shutdown)
            uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+: this cancel is handled here
            if uncancel is not None:
                uncancel()
            raise SendStalled from None
        finally:
            timer.cancel()

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()


async def send_all(responses: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
    """Write every message of ``responses`` to a server-streaming call, each within
    :data:`SEND_SECONDS` (see the module docstring). The response headers go out with the first
    message ready, so a refusal raised before it (an abort in ``responses``) stays a trailers-only
    response. However this ends, ``responses`` is closed first.

    Raises:
        grpc.aio.AbortError: a stalled write (DEADLINE_EXCEEDED, reason ``send_timeout``), or
            ``responses``' own abort. Whatever else ``responses`` raises.
    """
    deadline, headers_sent = _WriteDeadline(), False
    try:
        async with contextlib.aclosing(responses):
            async for message in responses:
                if not headers_sent:
                    # alone: a status can be queued behind a stalled message, not behind stalled headers
                    await deadline.run(context.send_initial_metadata(()))
                    headers_sent = True
                await deadline.run(context.write(message))
    except SendStalled:
        _lines.info(("grpc", SEND_TIMEOUT), "gRPC: streams whose client read nothing of them for %g s ended "
                    "(DEADLINE_EXCEEDED, send_timeout)", SEND_SECONDS)
        if headers_sent:
            await abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"this stream's client read nothing of it for {SEND_SECONDS:g} s (its HTTP/2 flow-control "
                        "window stayed full), so the server ended it; read a stream's responses as they "
                        "arrive", SEND_TIMEOUT)
        # else the headers themselves stalled (the connection's socket full): no status can be queued
