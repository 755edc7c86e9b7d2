"""Whose address an HTTP request came from: ``X-Forwarded-For`` taken from a trusted proxy only
when it names an IP address (DESIGN §6).

uvicorn, as vLLM runs it, replaces ``request.client`` with ``X-Forwarded-For``'s address when the
connection comes from an address ``FORWARDED_ALLOW_IPS`` trusts (loopback by default), whatever
the header holds: a process on the server's host (a sidecar, another user's job) can then set a
request's logged ``client=`` to any text. :class:`ForwardedFor` runs uvicorn's own
``ProxyHeadersMiddleware`` (same trust rule, same choice of address in a list) and keeps the
connection's address where the address it chose is not an IP address.
"""

from __future__ import annotations

import ipaddress

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware


def ip_address(host: object) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (``ipaddress``'s syntax; an IPv6 zone such as
    ``fe80::1%eth0`` included)."""
    if not isinstance(host, str):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ForwardedFor:
    """ASGI wrapper in place of uvicorn's ``proxy_headers``: ``scope["client"]`` becomes
    ``X-Forwarded-For``'s (host, port) as uvicorn chooses it (``trusted``: uvicorn's
    ``forwarded_allow_ips``, a comma-separated list of addresses / networks or ``*``) when that host
    is an IP address; otherwise the connection's (host, port) stays."""

    def __init__(self, app, trusted: list[str] | str):
        self.app = app
        self._proxy = ProxyHeadersMiddleware(self._checked, trusted_hosts=trusted)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        connection = scope.get("client")
        scope = dict(scope, **{"nlora.connection": connection})
        await self._proxy(scope, receive, send)

    async def _checked(self, scope, receive, send) -> None:
        connection = scope.pop("nlora.connection", None)
        client = scope.get("client")
        if client is not connection and not (client and ip_address(client[0])):
            scope["client"] = connection
        await self.app(scope, receive, send)
