"""The OpenAI-compatible HTTP API (FastAPI) over the same engine, keys, admission and metrics as
the gRPC front end (DESIGN §6).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (whole or SSE-streamed),
``GET /v1/models`` (the base model and the adapters this key may use) and ``GET /v1/models/{model}``
(one of them; 404 for a name it may not use, as for one that does not exist), ``GET /health``, and
``GET /metrics`` (Prometheus, no key: as vLLM serves it on its API port; no label names a tenant).

A generation request is admitted like a gRPC Generate (frontend.py), in this order: key (401),
draining (503), the bounded queue and the tenant's quota and queue share (429), all before the
body is read: from here the request holds its place in the queue (a Reservation, given back
however it ends, the client's going away included), so a tenant's bodies in memory and prompts
waiting for the tokenizer are bounded by its quota and share, and a refused body is never read;
then the body (408 when it has not arrived :data:`BODY_READ_SECONDS` after the headers), ``model`` -> adapter and grant (403, before the name is looked up and before the other
fields are validated), JSON and fields (400), the prompt (400: empty, too long, a bad message;
only now is it tokenized or the chat rendered), then the engine: a prompt plus max_tokens over
max_model_len (400, vLLM's words), unknown model (404, never the base model instead), no adapter
slot (429). (gRPC decides the queue after the fields: its message has arrived whole by then.)
Each refusal is counted in ``nlora_requests_rejected_total{frontend="http"}``. Errors have
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with ``code`` our rejection
reason.

A request the engine aborts for a reason (a forced unload of its adapter, engine shutdown) ends
with that reason: a 409 error (code "aborted") for a whole response, an error event
``data: {"error": {...}}`` in an SSE stream. A client that goes away frees the request at once,
and is no error: a closed SSE stream, or a closed connection while a whole response is being
generated, closes the engine stream (abort, KV blocks and adapter pin freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from nlora_serve.adapters.registry import AdapterNotFound
from nlora_serve.errors import NloraError, capped, shown
from nlora_serve.serving.auth import Authenticator, PermissionDenied, Principal
from nlora_serve.engine.api import Engine, EngineError, RequestAborted, max_prompt_bytes
from nlora_serve.serving.frontend import Admission, adapter_versions, cache_salt_of, metered, start_request
from nlora_serve.serving.grpc_status import BodyTimeout, http_status_of
from nlora_serve.serving.http_body import parsed_json, validated
from nlora_serve.serving.http_openai import ChatRequest, CompletionRequest, chat_params, chat_prompt, completion_inputs
from nlora_serve.serving.http_responses import Shaper, sse
from nlora_serve.serving.metrics import ServerMetrics
from nlora_serve.serving.server_config import ServerConfig

# an admitted request holds its tenant's place (quota, queue share) while its body is read: a body
# held back gets 408 after this long (16 MiB, the largest body, in 60 s is ~2 Mbit/s)
BODY_READ_SECONDS = 60.0
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


@dataclass(slots=True)
class HttpContext:
    """What the routes serve from: the gRPC server's own engine, keys, metrics and admission."""

    engine: Engine
    config: ServerConfig
    auth: Authenticator
    metrics: ServerMetrics
    admission: Admission
    tokenizer: object  # renders chat prompts and decodes logprob tokens
    base_model: str  # the base model's served name (GetServerInfo's ``model``)
    started: int = field(default_factory=lambda: int(time.time()))  # ``created`` of /v1/models entries
    chat_bounds: tuple[int, int] = (0, 0)  # chats past these (content characters, messages): refused untokenized

    def __post_init__(self) -> None:
        self.chat_bounds = (max_prompt_bytes(self.tokenizer, self.engine.max_model_len), self.engine.max_model_len)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON; a message over :data:`~nlora_serve.errors.MAX_ERROR_CHARS` is cut,
    saying how long it was."""
    param = None if param is None else shown(param)
    return {"error": {"message": capped(message), "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def build_app(ctx: HttpContext) -> FastAPI:
    """The FastAPI application of one server (no docs or OpenAPI routes).

    The routes and handlers are module-level functions that find ``ctx`` on ``app.state``, never
    closures over it: FastAPI keeps every endpoint and dependency callable it has seen in a
    process-wide cache (4,096 entries in 0.165), so a closure would keep a stopped server's engine
    and its weights alive for as long as the process runs.
    """
    app = FastAPI(title="nlora-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.nlora = ctx
    app.include_router(_router)
    for exc_type, handler in _ERROR_HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    return app


_router = APIRouter()


def _ctx(request: Request) -> HttpContext:
    return request.app.state.nlora


def _principal(request: Request) -> Principal:
    return _ctx(request).auth.authenticate(request.headers.items())


@_router.get("/health")
async def _health(request: Request) -> JSONResponse:
    draining = _ctx(request).admission.draining
    return JSONResponse({"status": "draining" if draining else "ok"}, status_code=503 if draining else 200)


@_router.get("/metrics")
async def _metrics(request: Request) -> Response:
    body, content_type = _ctx(request).metrics.exposition()
    return Response(body, media_type=content_type)


@_router.get("/v1/models")
async def _models(request: Request, caller: Principal = Depends(_principal)) -> dict:
    return {"object": "list", "data": _model_entries(_ctx(request), caller)}


@_router.get("/v1/models/{model:path}")  # OpenAI's "retrieve model"; :path keeps a name with '/'
async def _model(request: Request, model: str, caller: Principal = Depends(_principal)) -> JSONResponse:
    found = [entry for entry in _model_entries(_ctx(request), caller) if entry["id"] == model]
    if found:
        return JSONResponse(found[0])
    # one answer for unknown and not granted, as OpenAI words it: a key cannot probe names
    return JSONResponse(error_body(f"the model {shown(model)!r} does not exist or this key may not use it "
                                   "(GET /v1/models lists those it may use)", 404, "model", "not_found"), 404)


# the body is read and validated in _generate, after the key and the grant: FastAPI would
# parse and validate a declared body before any dependency (a keyless bad body: 400, not 401)
@_router.post("/v1/completions")
async def _completions(request: Request) -> Response:
    return await _generate(_ctx(request), request, chat=False)


@_router.post("/v1/chat/completions")
async def _chat_completions(request: Request) -> Response:
    return await _generate(_ctx(request), request, chat=True)


def _refused(request: Request, reason: str) -> None:
    if request.url.path in GENERATE_PATHS:  # as gRPC counts Generate refusals only
        _ctx(request).metrics.reject(reason, "http")


async def _expected(request: Request, exc: NloraError) -> JSONResponse:
    status, reason = http_status_of(exc)
    _refused(request, reason)
    message = str(exc)
    if isinstance(exc, AdapterNotFound):
        message += _not_found_hint(_ctx(request), request)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(message, status, getattr(exc, "param", None), reason), status, headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    _refused(request, "invalid_argument")
    if first.get("type") == "json_invalid":  # loc is ("body", <character offset>)
        at = first.get("loc", ("body", "?"))[-1]
        return JSONResponse(error_body(f"request body is not valid JSON (at character {at})", 400, None,
                                       "invalid_argument"), 400)
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg')}", 400, where or None,
                                   "invalid_argument"), 400)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code)  # every error body carries a code
    return JSONResponse(error_body(str(exc.detail), exc.status_code, code=code), exc.status_code, exc.headers)


async def _engine_failed(request: Request, exc: EngineError) -> JSONResponse:
    return JSONResponse(error_body(str(exc), 500, code="engine_error"), 500)


async def _aborted(request: Request, exc: RequestAborted) -> JSONResponse:
    return JSONResponse(_aborted_body(exc), http_status_of(exc)[0])  # admitted: not a refusal


_ERROR_HANDLERS = {NloraError: _expected, RequestValidationError: _invalid, HTTPException: _http_error,
                   EngineError: _engine_failed, RequestAborted: _aborted}


def _model_entries(ctx: HttpContext, caller: Principal) -> list[dict]:
    """/v1/models entries this caller may use: the base model (no parent), then the adapters, whose
    parent is the base model's name only for a caller granted the base model (gRPC's
    GetServerInfo hides the name from the others too)."""
    names = [v.name for v in adapter_versions(ctx.engine) or []]
    base = caller.may_use(None)
    entries = [(ctx.base_model, None)] if base else []
    entries += [(name, ctx.base_model if base else None) for name in names
                if caller.may_use(name) and name != ctx.base_model]
    return [{"id": name, "object": "model", "created": ctx.started, "owned_by": "nlora-serve", "parent": parent}
            for name, parent in entries]


def _not_found_hint(ctx: HttpContext, request: Request) -> str:
    """How to name a model, for a 404; the base model's name only to a caller that may use it."""
    try:
        may_use_base = ctx.auth.authenticate(request.headers.items()).may_use(None)
    except NloraError:
        may_use_base = False
    base = f", or {ctx.base_model!r} for the base model" if may_use_base else ""
    return f"; 'model' names an adapter{base} (GET /v1/models lists those this key may use)"


# Starlette's own refusals (body limit, unknown route, wrong method) and our code for each
_HTTP_CODES = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}


def _check_grant(caller: Principal, model: str, base_model: str) -> None:
    """PermissionDenied unless the caller may use ``model`` (the base model's name: no adapter), in
    one wording for every name, so that a key not granted the base model cannot tell its name from
    any other."""
    if not caller.may_use(None if model == base_model else model):
        raise PermissionDenied(f"key of {caller.name!r} is not granted model {shown(model)!r}")


def _aborted_body(exc: RequestAborted) -> dict:
    status, code = http_status_of(exc)
    return error_body(str(exc), status, code=code)


async def _generate(ctx: HttpContext, request: Request, chat: bool) -> Response:
    """Admit one generation request and answer it whole or as an SSE stream.

    Raises:
        NloraError: a refusal (the app's handler answers it). RequestValidationError: a body that
            is not JSON or not a valid request. EngineError: the engine failed before the first
            token. RequestAborted: the engine aborted the request (whole responses, or before the
            first token).
    """
    timer = ctx.metrics.request("http")
    caller = ctx.auth.authenticate(request.headers.items())
    # draining (503), queue and quota (429) before the body is read: a tenant's bodies in memory
    # (16 MiB each at most) are bounded by its quota and queue share, as are its prompts waiting
    # for the tokenizer; refused, a request's body is never read
    reservation = ctx.admission.reserve(caller)
    try:
        started = await _start(ctx, request, chat, caller)
    except BaseException:
        reservation.release()
        raise
    if started is None:  # gone before its body arrived or while its prompt waited for the tokenizer
        reservation.release()
        return Response(status_code=499)
    stream, body, params, rid = started
    deltas = metered(stream, timer, reservation)
    shaper = Shaper(rid, body.model, chat, ctx.tokenizer, params.logprobs, body.return_tokens_as_token_ids,
                    body.include_usage)
    if not body.stream:
        return await _whole(request, deltas, shaper)
    return await _streamed(request, deltas, shaper)


async def _start(ctx: HttpContext, request: Request, chat: bool, caller: Principal) -> tuple | None:
    """Read and validate an admitted request's body, then tokenize its prompt and queue it in the
    engine (:func:`_started`): (engine stream, body, sampling params, response id), or None when the
    client went away first.

    Raises:
        NloraError, RequestValidationError: see :func:`_generate`.
    """
    try:
        body = await asyncio.wait_for(request.body(), BODY_READ_SECONDS)
    except ClientDisconnect:  # gone before its body arrived: nothing to answer, nothing to log
        return None
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {BODY_READ_SECONDS:g} s of its headers") from None
    data = parsed_json(body, request.headers.get("content-type"))
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, str):  # else the validation below refuses it
        _check_grant(caller, model, ctx.base_model)
    body = validated(ChatRequest if chat else CompletionRequest, data)
    prompt, params = (None, chat_params(body, ctx.config)) if chat else completion_inputs(body, ctx.config)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    stream = await _unless_disconnected(request, _started(ctx, caller, body, prompt, params, rid))
    return None if stream is None else (stream, body, params, rid)


async def _started(ctx: HttpContext, caller: Principal, body, prompt: str | list[int] | None,
                   params, rid: str) -> AsyncIterator:
    """Tokenize an admitted request's prompt (chat: render it; ``prompt`` None) in its tenant's turn
    (TokenizerTurns) and queue it in the engine; the engine stream.

    Raises:
        RequestError: the prompt (too long, a bad message), or from :func:`start_request`.
            AdapterNotFound: an adapter asked of a server that serves none.
    """
    turns = ctx.admission.tokenizer
    if prompt is None:
        prompt = await turns.run(caller.name, chat_prompt, body, ctx.tokenizer, ctx.chat_bounds)
    else:
        prompt = await turns.run(caller.name, ctx.engine.prompt_ids, prompt)
    adapter = None if body.model == ctx.base_model else body.model
    if adapter is not None and adapter_versions(ctx.engine) is None:
        raise AdapterNotFound(f"model {shown(body.model)!r} does not exist: this server serves no adapters")
    return start_request(ctx.engine, prompt, params, f"{caller.name}/{rid}", adapter, body.max_tokens_given,
                         caller, cache_salt_of(caller, body.cache_salt, ctx.auth))


async def _whole(request: Request, deltas: AsyncIterator, shaper: Shaper) -> Response:
    async def collect() -> list:
        async with contextlib.aclosing(deltas):
            return [out async for out in deltas]

    outs = await _unless_disconnected(request, collect())
    return Response(status_code=499) if outs is None else JSONResponse(shaper.whole(outs))


async def _streamed(request: Request, deltas: AsyncIterator, shaper: Shaper) -> Response:
    """Wait for the first delta (so an engine failure is still a proper HTTP error), then stream."""
    async def first():
        return await anext(deltas)

    out = await _unless_disconnected(request, first())  # on any failure the metered stream is closed already
    if out is None:
        return Response(status_code=499)
    return EngineStreamResponse(_events(out, deltas, shaper), deltas)


async def _events(first, deltas: AsyncIterator, shaper: Shaper) -> AsyncIterator[str]:
    """SSE messages: (chat: the role chunk), one chunk per delta, (the usage chunk), [DONE]."""
    opening = shaper.first_chunk()
    if opening is not None:
        yield sse(opening)
    out = first
    try:
        while True:
            yield sse(shaper.chunk(out))
            if out.finished:
                break
            out = await anext(deltas)
    except EngineError as exc:  # headers are sent: report in-band, as OpenAI-compatible servers do
        yield sse(error_body(str(exc), 500, code="engine_error"))
        return
    except RequestAborted as exc:
        yield sse(_aborted_body(exc))
        return
    if shaper.include_usage:
        yield sse(shaper.usage_chunk(out))
    yield sse("[DONE]")


class EngineStreamResponse(StreamingResponse):
    """An SSE response over a metered engine stream that is closed however the response ends
    (finished, client gone, server shutdown): an unfinished request is aborted at once."""

    def __init__(self, events: AsyncIterator[str], deltas: AsyncIterator):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events, self._deltas = events, deltas

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._deltas.aclose()


async def _unless_disconnected(request: Request, work: Awaitable):
    """``await work``, unless the client disconnects first: then ``work`` is cancelled (closing the
    engine stream it reads) and None is returned."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
