"""Calls refused on their metadata alone, before the server reads their request.

The server's receive limit is one for every method, large enough for a SwapAdapter to carry a whole
N (grpc_api/limits.py). A servicer checks the caller's key only once grpc has received and parsed the
request, so without this a client with no key could make the server take a request of that size
whole, as many at once as it likes (the limit grows with the model and ``--max-rank``; at a
257 MiB limit, four 200 MiB Generate requests at once cost +2.1 GB and 3.7 s gaps in other
tenants' streams).
:class:`KeyFirst` is a server interceptor that authenticates every call of our services
(``nlora_serve.v1.*``) from its metadata before any message is read, and refuses a non-admin key
on the AdapterAdmin service the same way. A refused call gets a handler that reads nothing (a
request-stream handler that never iterates its stream) and aborts with the status and message the
servicer would have given. Calls that pass go on to the servicers, which check again (grants,
``require_admin``). Health and reflection are left alone.
"""

from __future__ import annotations

import grpc

from nlora_serve.errors import NloraError
from nlora_serve.serving.admin_log import AdminRefusals
from nlora_serve.serving.auth import Authenticator, Principal
from nlora_serve.serving.grpc_api.decode import GENERATE, PREFIX
from nlora_serve.serving.status import abort, status_of
from nlora_serve.serving.metrics import ServerMetrics

ADMIN_SERVICE = PREFIX + "AdapterAdmin/"


class KeyFirst(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED (no or an unknown key) or PERMISSION_DENIED (a tenant key on AdapterAdmin)
    before the request is read; refusals of Generate are counted in ``metrics`` as its servicer
    counts them, a tenant key's AdapterAdmin calls logged in ``admin_refusals`` (the AdminServicer's:
    admin_log.py)."""

    def __init__(self, auth: Authenticator, metrics: ServerMetrics,
                 admin_refusals: AdminRefusals | None = None) -> None:
        self.auth, self.metrics, self.admin_refusals = auth, metrics, admin_refusals

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(PREFIX):
            return await continuation(handler_call_details)
        principal = None
        try:
            principal = self.auth.authenticate(handler_call_details.invocation_metadata)
            if method.startswith(ADMIN_SERVICE):
                principal.require_admin(method.rsplit("/", 1)[-1])
        except NloraError as exc:
            key = (self.auth.presented_key_id(handler_call_details.invocation_metadata)
                   if method == GENERATE and self.metrics.wants_tenant else None)  # an unknown key's id, for the log
            return self._refusal(method, principal, exc, key)
        return await continuation(handler_call_details)

    def _refusal(self, method: str, principal: Principal | None, exc: NloraError,
                 key: str | None = None) -> grpc.RpcMethodHandler:
        """A handler that counts or logs the refusal (with the caller's address, which only a
        call's context knows, and ``key``, the id of the unknown key it came with) and aborts with ``exc``'s status without reading the request: grpc
        reads a request stream's messages only as the handler iterates it, and this one never does."""
        code, reason = status_of(exc)

        async def refuse(request_iterator, context: grpc.aio.ServicerContext):
            if method == GENERATE:  # no key checked yet: no tenant
                self.metrics.reject(reason, "grpc", None, str(exc), client=context.peer(), key=key)
            elif principal is not None and self.admin_refusals is not None:  # a tenant key on AdapterAdmin
                self.admin_refusals.refused(method.rsplit("/", 1)[-1], principal, code.name, exc, context.peer())
            await abort(context, code, str(exc), reason)
        return grpc.stream_stream_rpc_method_handler(refuse)
