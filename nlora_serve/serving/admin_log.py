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
``caller``, ``is_admin``, ``client``, ``status``, ``error``; a change done (grpc_api/admin.py,
http_api/lora_admin.py) writes ``event`` ``admin_done``, ``operation``, ``caller``, ``adapter``,
``adapter_version``, ``duration_ms`` where its line names them.

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
