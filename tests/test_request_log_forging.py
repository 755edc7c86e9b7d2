"""A client-chosen value cannot forge another field of a request line (serving/request_log.py), and
an ``X-Forwarded-For`` that is not an IP address is not taken as the client's address
(serving/http_api/forwarded.py), at unit level: no server."""

from __future__ import annotations

import ast
import asyncio
import logging
import re

import pytest

from nlora_serve.serving.http_api.forwarded import ForwardedFor
from nlora_serve.serving.request_log import RequestLog, client_address, quoted

LOGGER = "nlora_serve.requests"
FORGED = "x tenant='evil' key=deadbeef reason=queue_full"


def _line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_client_chosen_value_cannot_forge_a_field(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    # a forwarded address and a gRPC request id, both before tenant=: a first-match search found 'evil'
    RequestLog().refused("grpc", "permission_denied", "acme", FORGED, request_id=FORGED, client=(FORGED, 0))
    line = _line(caplog)
    assert re.search(r"tenant='([^']*)'", line).group(1) == "acme"
    assert re.search(r"reason=(\S+)", line).group(1) == "permission_denied"
    assert re.findall(r"(\w+)=", line) == ["frontend", "client", "tenant", "reason", "message"]
    # still a Python literal of the value
    assert ast.literal_eval(quoted(FORGED)) == FORGED and quoted("a=b") == "'a\\x3db'"
    assert client_address((FORGED, 0)) == quoted(FORGED)


async def _client_seen(client: tuple, headers: list[tuple[bytes, bytes]], trusted="127.0.0.1,::1") -> tuple:
    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)

    await ForwardedFor(app, trusted)({"type": "http", "client": client, "headers": headers, "scheme": "http"},
                                     None, None)
    assert "nlora.connection" not in seen
    return seen["client"]


@pytest.mark.parametrize("client, forwarded, seen", [
    (("127.0.0.1", 5000), b"203.0.113.7", ("203.0.113.7", 0)),  # a loopback proxy: its client taken
    (("127.0.0.1", 5000), b"[2001:db8::7]:443", ("2001:db8::7", 443)),
    (("127.0.0.1", 5000), b"10.0.0.1, 203.0.113.7", ("203.0.113.7", 0)),  # the last untrusted, as uvicorn
    (("127.0.0.1", 5000), FORGED.encode(), ("127.0.0.1", 5000)),  # not an address: the connection's kept
    (("127.0.0.1", 5000), b"evil.example", ("127.0.0.1", 5000)),
    (("192.0.2.1", 5000), b"203.0.113.7", ("192.0.2.1", 5000)),  # an untrusted peer's header: ignored
])
def test_x_forwarded_for_is_taken_only_as_an_ip_address(client, forwarded, seen):
    assert asyncio.run(_client_seen(client, [(b"x-forwarded-for", forwarded)])) == seen
