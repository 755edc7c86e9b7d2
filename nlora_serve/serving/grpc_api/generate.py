"""The Generation service: stream completions, list the caller's adapters, describe the server.

Admission (in this order, each refusal a status code and a count in
``nlora_requests_rejected_total{frontend="grpc"}``): key (UNAUTHENTICATED), grant
(PERMISSION_DENIED, checked before the name is looked up, so a tenant cannot probe other tenants'
adapter names), an adapter name outside the naming rule, request id and parameters
(INVALID_ARGUMENT), draining (UNAVAILABLE), the bounded queue and the tenant's quota and queue
share (RESOURCE_EXHAUSTED; from here the request holds its place in the queue, so these are
decided before its prompt takes the tokenizer thread), the prompt (INVALID_ARGUMENT: empty, too
long, a bad chat message), then the engine: unknown adapter (NOT_FOUND; a LoRA with no slot free
waits for one, engine/slot_wait.py). The HTTP front end (http_api/routes.py) admits the same way (admission.py), but
for the name rule: HTTP's ``model`` is looked up as sent (404). A prompt that leaves no
room in max_model_len for one generated token is INVALID_ARGUMENT; a max_tokens over the room left
is lowered to it, as vLLM 0.32 lowers it (the stream then ends with LENGTH at the context's end);
max_tokens 0 (unset) is the rest of the context.

A stream the engine aborts for a reason (a forced unload of its adapter, engine shutdown) ends
with ABORTED and that reason as details; a failed engine step ends it with INTERNAL. Every refusal
and every such end carries its reason in the trailing metadata ``nlora-reason`` (``queue_full``,
``not_found``, ...; ``aborted``; ``engine_error``), as HTTP's error ``code`` names it.

A client that reads nothing of its stream for 60 s (its HTTP/2 window full) loses it: the request
ends as a cancel ends it, and the call DEADLINE_EXCEEDED with ``send_timeout`` (send_deadline.py).

Client-chosen request ids are prefixed with the caller's name inside the engine, so tenants
never collide with (or learn about) each other's ids; responses echo the id the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from nlora_serve.adapters.names import validate_name
from nlora_serve.errors import AdapterError, NloraError
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.grpc_api import convert
from nlora_serve.serving.grpc_api.send_deadline import send_all
from nlora_serve.serving.auth import Authenticator
from nlora_serve.engine.api import Engine, EngineError, RequestAborted, max_prompt_bytes
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.request_policy import cache_salt_of
from nlora_serve.serving.stream import Metered, adapter_versions, start_request
from nlora_serve.serving.status import ENGINE_ERROR, abort, status_of
from nlora_serve.serving.metrics import RequestTimer, ServerMetrics, key_of, tenant_of
from nlora_serve.serving.server_config import ServerConfig

log = logging.getLogger(__name__)


class GenerationServicer(pb_grpc.GenerationServicer):
    """Tenants' RPCs over an :class:`Engine`; ``tokenizer`` renders chat prompts."""

    def __init__(self, engine: Engine, config: ServerConfig, auth: Authenticator, metrics: ServerMetrics,
                 admission: Admission, tokenizer, info: pb.ServerInfo):
        self.engine, self.config, self.auth = engine, config, auth
        self.metrics, self.admission, self.tokenizer, self.info = metrics, admission, tokenizer, info
        # chats past these (content characters, messages) surely exceed the context: refused untokenized
        self.chat_bounds = (max_prompt_bytes(tokenizer, engine.max_model_len), engine.max_model_len)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        # each write within SEND_SECONDS: a client that reads nothing must not hold its request for ever
        await send_all(self._responses(request, context), context)

    async def _responses(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Generate's responses, admitted and streamed from the engine (aborts the call on a refusal)."""
        timer = self.metrics.request("grpc", client=context.peer())
        try:
            stream, shown_id, reservation, scored = await self._admit(request, context, timer)
        except NloraError as exc:
            code, reason = status_of(exc)
            self.metrics.reject(reason, "grpc", timer.caller, str(exc), timer.record and timer.record.request_id,
                                context.peer(), timer.caller_key)
            await abort(context, code, str(exc), reason)
        try:
            # aclosing: on cancel, disconnect or deadline the metered stream is closed here, which
            # aborts the request, frees its KV blocks and adapter pin and releases its admission at once
            deltas = Metered(stream, timer, reservation)
            async with contextlib.aclosing(deltas):
                async for out in deltas:
                    msg = convert.response(out, scored)
                    msg.request_id = shown_id or out.request_id
                    if out.finished:
                        msg.usage.time_to_first_token_s = timer.first or 0.0
                        msg.usage.duration_s = timer.duration
                    yield msg
        except RequestAborted as exc:
            code, reason = status_of(exc)
            await abort(context, code, str(exc), reason)
        except EngineError as exc:
            log.error("%s", exc)
            await abort(context, grpc.StatusCode.INTERNAL, str(exc), ENGINE_ERROR)

    async def _admit(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, timer: RequestTimer):
        principal = self.auth.authenticate(context.invocation_metadata())
        timer.set_tenant(tenant_of(self.auth, principal), key_of(self.auth, principal))
        # the request log's line names them, refused or not (an id over the limit: its first 200 characters)
        timer.describe(request.request_id or None, request.adapter or None, None)
        adapter = request.adapter or None
        if adapter is not None and adapter == self.config.served_model_name and principal.may_use(None):
            # HTTP's 'model' takes the base model's name; here the base model is no adapter (a caller
            # not granted the base model gets the refusal of any other name, below)
            raise AdapterError(f"GenerateRequest.adapter {adapter!r} is the base model's name: leave adapter "
                               "empty to run the base model")
        principal.check(adapter)
        if adapter is not None:
            validate_name(adapter)  # a name no adapter can have: INVALID_ARGUMENT, before any other work
        request_id = convert.request_id_of(request)
        salt = convert.cache_salt(request)
        special = convert.add_special_tokens(request)
        params = convert.sampling_params(request.sampling, self.config)
        # draining, the queue and the tenant's quota, before the prompt takes the tokenizer thread
        reservation = self.admission.reserve(principal)
        try:  # a refusal from here on, or the call cancelled (client gone, deadline), gives the place back
            # off the loop, on the tokenizer thread in the tenant's turn
            if params.structured_outputs is not None:  # compiled before the prompt: a bad spec costs no tokenizing
                await self.admission.grammar.run(principal.name, self.engine.check_structured,
                                                 params.structured_outputs, principal.name)
            prompt = await self.admission.tokenizer.run(principal.name, self._prompt_ids, request, special)
            timer.describe(request_id or None, adapter, prompt)
            engine_id = f"{principal.name}/{request_id}" if request_id else None
            stream = start_request(self.engine, prompt, params, engine_id, adapter, principal=principal,
                                   cache_salt=cache_salt_of(principal, salt, self.auth))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # the client went away (cancel, deadline) while its
                timer.ended("cancelled")  # prompt waited or was tokenized: an admitted request's end, as HTTP's
            reservation.release()  # after the count: who waits for the admission count to drop reads it counted
            raise
        scored = None if params.prompt_logprobs is None else (prompt, params.prompt_logprobs)
        return stream, request_id, reservation, scored

    def _prompt_ids(self, request: pb.GenerateRequest, special: bool) -> list[int]:
        """The request's prompt as token ids (chat rendered, text tokenized, with the tokenizer's
        special tokens when ``special``): on the tokenizer thread."""
        return self.engine.prompt_ids(convert.prompt_of(request, self.tokenizer, self.chat_bounds), special)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext):
        try:
            principal = self.auth.authenticate(context.invocation_metadata())
        except NloraError as exc:
            code, reason = status_of(exc)
            await abort(context, code, str(exc), reason)
        versions = adapter_versions(self.engine) or []

        def active(version) -> int | None:
            # a tenant counts its own requests only: an adapter granted to several tenants runs theirs too
            return None if principal.is_admin else self.engine.adapters.requests_of(version, principal.name)

        return pb.ListAdaptersResponse(
            adapters=[convert.adapter_info(v, self.engine.is_resident(v), active(v)) for v in versions
                      if principal.may_use(v.name)],
            base_model_allowed=principal.may_use(None))

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext):
        try:
            principal = self.auth.authenticate(context.invocation_metadata())
        except NloraError as exc:
            code, reason = status_of(exc)
            await abort(context, code, str(exc), reason)
        if principal.may_use(None):
            return self.info
        # a tenant without the base model learns neither its name nor its fingerprint, as HTTP's
        # /v1/models and its 404 for the base name do not tell it
        hidden = pb.ServerInfo()
        hidden.CopyFrom(self.info)
        hidden.model, hidden.model_fingerprint = "", ""
        return hidden

