"""Requests over their method's size bound get RESOURCE_EXHAUSTED before they are parsed, and
requests that are not valid protobuf get INVALID_ARGUMENT, naming the message type.

grpc.aio parses a request with the handler's ``request_deserializer`` before any servicer code
runs; when that raises, the caller sees UNKNOWN ("Exception deserializing request"), which reads
like a server fault. :class:`BoundedDecode` is a server interceptor that takes parsing into the
handler for our own services (``nlora_serve.v1.*``): the server hands the handler raw bytes, the
handler parses them, and a ``DecodeError`` aborts the call with INVALID_ARGUMENT. A request
stream (UploadAdapter) is parsed message by message the same way. grpc's health service is wrapped
too: a corrupt Health/Check needs no key, and grpc logs a full traceback for each one it fails to
parse, so without this anyone could fill the log. So is grpc's reflection service (stream-stream,
keyless too).

Each message is first held to its method's bound (limits.MessageLimits.bound: Generate the
largest legal request, the small RPCs, health and reflection 64 KiB): grpc's own receive limit is one for every
method and must let a whole SwapAdapter payload through, so without this a tenant's Generate
request of several MiB would be parsed whole before validation refused it. An over-size message
aborts the call with RESOURCE_EXHAUSTED naming the method, its size and the bound (a Generate is
counted in nlora_requests_rejected_total, as its servicer counts a refusal, and with --tenant-metrics
for the tenant of the key in its metadata); the parser and the servicer never see it. Both refusals
carry the reason ``invalid_argument`` in the trailing metadata ``nlora-reason`` (the reason an
over-size Generate is counted under, as HTTP counts a body over its limit).

A message over grpc's own receive limit (limits.MessageLimits.receive_bytes) never reaches this
module: grpc's core refuses it (RESOURCE_EXHAUSTED, "Received message larger than max") and ends
the call itself before any handler runs (a unary handler is never called; a request stream just
ends), so no server code can add a reason to that refusal.
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError

from nlora_serve.serving.status import TooLarge, abort, status_of

INVALID = "invalid_argument"  # the reason (nlora-reason) of a request that does not parse, as of any bad request
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.metrics import ServerMetrics, caller_of_key

PREFIX = "/nlora_serve.v1."  # our services (nlora.proto's package)
GENERATE = PREFIX + "Generation/Generate"
HEALTH = "/grpc.health.v1.Health/"  # grpc's health service, unauthenticated by design
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/"  # grpc's reflection service, unauthenticated too
WRAPPED = (PREFIX, HEALTH, REFLECTION)  # the services whose requests this module parses


class BoundedDecode(grpc.aio.ServerInterceptor):
    """RESOURCE_EXHAUSTED for a request (or request-stream message) over its method's bound, before
    parsing; INVALID_ARGUMENT, not UNKNOWN (and no traceback in the log), for one that is not a
    valid protobuf of its method's request type.

    Args:
        limits: the bounds (a limits.MessageLimits: ``bound(method)`` bytes or None).
        metrics: where a refused Generate is counted.
        auth: whose tenant a refused Generate is counted for.
    """

    def __init__(self, limits, metrics: ServerMetrics, auth: Authenticator) -> None:
        self.limits, self.metrics, self.auth = limits, metrics, auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None or not method.startswith(WRAPPED):
            return handler
        parse = _parser(handler.request_deserializer, method)
        max_bytes = self.limits.bound(method)
        if max_bytes is not None:
            parse = _bounded(parse, method, max_bytes, (self.metrics, self.auth) if method == GENERATE else None)
        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=None, unary_unary=_unary_unary(handler.unary_unary, parse))
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=None, unary_stream=_unary_stream(handler.unary_stream, parse))
        if handler.stream_unary is not None:
            return handler._replace(request_deserializer=None, stream_unary=_stream_unary(handler.stream_unary, parse))
        if handler.stream_stream is not None:  # reflection (nlora.proto has none)
            return handler._replace(request_deserializer=None,
                                    stream_stream=_stream_stream(handler.stream_stream, parse))
        return handler


def _parser(deserialize, method: str):
    async def parse(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            return deserialize(raw)
        except DecodeError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"{method}: the request is not a valid protobuf message of its type ({exc})", INVALID)
    return parse


def _bounded(parse, method: str, max_bytes: int, counted: tuple[ServerMetrics, Authenticator] | None):
    """``parse`` behind a size check: over ``max_bytes``, abort with TooLarge's status (counted in
    ``counted``'s metrics, for the caller's tenant, when given) without parsing."""
    async def bounded(raw: bytes, context: grpc.aio.ServicerContext):
        if len(raw) > max_bytes:
            name = method.rsplit("/", 1)[-1]
            exc = TooLarge(f"{name}: the request message is {len(raw):,} bytes, over the server's bound of "
                           f"{max_bytes:,} bytes for {name} requests (the largest a valid one can be); "
                           "refused before parsing")
            code, reason = status_of(exc)
            if counted is not None:
                metrics, auth = counted
                tenant, key = (caller_of_key(auth, context.invocation_metadata()) if metrics.wants_tenant
                               else (None, None))
                metrics.reject(reason, "grpc", tenant, str(exc), client=context.peer(), key=key)
            await abort(context, code, str(exc), reason)
        return await parse(raw, context)
    return bounded


def _unary_unary(behavior, parse):
    async def handle(raw, context):
        return await behavior(await parse(raw, context), context)
    return handle


def _unary_stream(behavior, parse):
    """A server-streaming handler either yields its responses (an async generator) or writes them
    with ``context.write`` (a coroutine: Generate, whose writes have a deadline, send_deadline.py;
    grpc's Health/Watch, which failed with UNKNOWN "'async for' requires an object with __aiter__
    method, got coroutine" while every handler was iterated); the wrapper keeps the handler's shape."""
    if not inspect.isasyncgenfunction(behavior):
        async def write(raw, context):
            await behavior(await parse(raw, context), context)
        return write

    async def handle(raw, context):
        async for response in behavior(await parse(raw, context), context):
            yield response
    return handle


def _stream_unary(behavior, parse):
    async def handle(raw_iterator, context):
        async def requests():
            async for raw in raw_iterator:
                yield await parse(raw, context)
        return await behavior(requests(), context)
    return handle


def _stream_stream(behavior, parse):
    async def requests(raw_iterator, context):
        async for raw in raw_iterator:
            yield await parse(raw, context)

    if not inspect.isasyncgenfunction(behavior):  # writes with context.write (see _unary_stream)
        async def write(raw_iterator, context):
            await behavior(requests(raw_iterator, context), context)
        return write

    async def handle(raw_iterator, context):
        async for response in behavior(requests(raw_iterator, context), context):
            yield response
    return handle
