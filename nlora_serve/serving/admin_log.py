"""The server log's lines for refused admin operations, on both surfaces (gRPC's AdapterAdmin RPCs,
HTTP's /v1/load_lora_adapter and /v1/unload_lora_adapter), beside the line each change done writes.

A refused change leaves nothing in the engine, but an operator reading the log after an incident
needs it: an admin's upload the loader refused or a swap that lost its ``if_version`` race (a deploy
that "went through" but serves the old weights), a tenant's key calling an admin operation (a
customer's tooling pointed at the wrong endpoint, or a leaked key probing). Each names the
operation, the caller's name from the tenants file, the address its call came from (when the front
end knows it: request_log.client_address), the status and the refusal's message:

    SwapAdapter by 'ops' from 10.0.0.7:51234 refused (FAILED_PRECONDITION): adapter 'lower': expected
    current version 1, have 2

(one line; no ``from`` where the front end does not know the address). With ``serve --log-format
json`` its values are keys of the line's object too: ``event`` ``admin_refused``, ``operation``,
``caller``, ``is_admin``, ``client``, ``status``, ``error``. A change done (grpc_api/admin.py,
http_api/lora_admin.py) is logged by :func:`log_done` the same way, with the address its call came
from (as the request log's ``client=``):

    SwapAdapter by 'ops' from 10.0.0.7:51234: adapter 'lower' v3 serving (inttune-tied, rank 8) (41 ms)

and the keys ``event`` ``admin_done``, ``operation``, ``caller``, ``client``, ``adapter``,
``adapter_version``, ``duration_ms`` where its line names them (HTTP's unload: ``draining_requests``,
no ``duration_ms``). A gRPC call its client cancelled (grpc_api/admin.py) is ``event``
``admin_cancelled`` with ``operation``, ``caller``, ``client``, ``duration_ms`` and ``note`` (how far
it got).

An admin's refusals are logged one by one (operators' calls are few and each matters); a tenant
key's at most once per 10 s per operation and tenant (:class:`~nlora_serve.errors.RefusalLog`,
which counts those left out), since any tenant could send them in a loop. A call whose key is
missing or unknown is not logged here: anyone who reaches the port can send those.
"""

from __future__ import annotations

import logging

from nlora_serve import log_format
from nlora_serve.errors import RefusalLog, capped
from nlora_serve.serving.auth import Principal
from nlora_serve.serving.request_log import client_address, peer


class AdminRefusals:
    """Writes the refusal lines of one server's admin surface to ``logger`` (INFO)."""

    def __init__(self, logger: logging.Logger):
        self._log = logger
        self._tenants = RefusalLog(logger)

    def refused(self, what: str, principal: Principal, status: str, exc: BaseException,
                client: str | tuple | None = None) -> None:
        """Log that ``principal``'s ``what`` (an RPC or an HTTP path) was refused with ``status``
        (a gRPC status code's name or an HTTP status) for ``exc``; ``client``: where the call came
        from (HTTP's ``request.client``, gRPC's ``context.peer()``), None: not said."""
        message = capped(str(exc))
        source = "" if client is None else f" from {client_address(client)}"
        extra = log_format.fields(event="admin_refused", operation=what, caller=principal.name,
                                  is_admin=principal.is_admin, client=peer(client), status=status, error=message)
        if principal.is_admin:
            self._log.info("%s by %r%s refused (%s): %s", what, principal.name, source, status, message, extra=extra)
        else:
            self._tenants.info((what, principal.name), "%s by tenant %r%s refused (%s): %s", what, principal.name,
                               source, status, message, extra=extra)


def log_done(logger: logging.Logger, what: str, caller: str, client: str | tuple | None, summary: str,
             **fields: object) -> None:
    """Log (INFO) that ``caller``'s ``what`` (an RPC or an HTTP path) changed what the server serves:
    ``{what} by {caller!r} from {client}: {summary}`` (no ``from`` where ``client`` is None; HTTP's
    ``request.client`` or gRPC's ``context.peer()``: request_log.client_address). ``fields``: the
    line's values as JSON keys beside ``event`` ``admin_done``, ``operation``, ``caller``, ``client``
    (``adapter``, ``adapter_version``, ``duration_ms``, ...)."""
    source = "" if client is None else f" from {client_address(client)}"
    logger.info("%s by %r%s: %s", what, caller, source, summary,
                extra=log_format.fields(event="admin_done", operation=what, caller=caller, client=peer(client),
                                        **fields))
