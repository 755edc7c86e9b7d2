"""Generation over HTTP: one completion, chat or Responses API request (an :class:`Endpoint` says
how each route reads its body and shapes its answer) from its admission to its answer, whole or
SSE-streamed.

A generation request is admitted like a gRPC Generate (admission.py), in this order: key (401),
draining (503), the bounded queue and the tenant's quota and queue share (429), all before the body
is read: from here the request holds its place in the queue (a Reservation, given back however it
ends, the client's going away included), so a tenant's bodies in memory and prompts waiting for the
tokenizer are bounded by its quota and share, and a refused body is never read; then the body (408
when it has not arrived :data:`BODY_READ_SECONDS` after the headers, 503 when the server begins to
drain first), ``model`` -> adapter and grant (403, before the name is looked up and before the other
fields are validated), JSON and fields (400), the other places of a request of ``n`` > 1 choices
or of a batch of P prompts (P x n engine requests: 429 when they are not free now, 400 naming ``n``
or ``prompt`` when they never could be), the prompt (400: empty, too long, a bad message; only now
is it tokenized, each prompt of a batch in its own tokenizer turn, or the chat rendered), then the
engine: a prompt that leaves no room in max_model_len for one generated token, or min_tokens over
the room it leaves (400, vLLM's words; a batch's names the prompt, and nothing of the batch runs; a
max_tokens over the room left is lowered to it, as vLLM 0.32 lowers it), unknown model (404, never
the base model instead), no adapter slot (429). (gRPC decides the queue after the fields: its message has arrived whole by then.) Each
refusal is counted in ``nlora_requests_rejected_total{frontend="http"}``. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with ``code`` our rejection reason.

A request the engine aborts for a reason (a forced unload of its adapter, engine shutdown) ends
with that reason: a 409 error (code "aborted") for a whole response, an error event
``data: {"error": {...}}`` in an SSE stream. A client that goes away frees the request at once,
and is no error: a closed SSE stream, or a closed connection while a whole response is being
generated, closes the engine stream (abort, KV blocks and adapter pin freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from nlora_serve.adapters.runtime.version import AdapterNotFound
from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.request_checks import fit_to_context
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.errors import shown
from nlora_serve.serving.auth import PermissionDenied, Principal
from nlora_serve.serving.admission import Admission, Reservation
from nlora_serve.serving.request_policy import cache_salt_of
from nlora_serve.serving.stream import Metered, adapter_versions, start_request
from nlora_serve.serving.status import BodyTimeout, Draining
from nlora_serve.serving.http_api.body import check_content_encoding, read_off_loop
from nlora_serve.serving.http_api.choices import check_choices, choice_params, of_prompt, start_choices
from nlora_serve.serving.http_api.context import HttpContext
from nlora_serve.serving.http_api.openai import chat_prompt
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest
from nlora_serve.serving.http_api.truncation import check_truncatable, truncated, truncation_of
from nlora_serve.serving.http_api.responses import Shaper, version_headers, whole_json
from nlora_serve.serving.metrics import RequestTimer, key_of, tenant_of

# an admitted request holds its tenant's place (quota, queue share) while its body is read: a body
# held back gets 408 after this long (16 MiB, the largest body, in 60 s is ~2 Mbit/s)
BODY_READ_SECONDS = 60.0


@dataclass(slots=True)
class Started:
    """An admitted request read, validated and queued in the engine (:func:`_start`)."""

    stream: AsyncIterator[RequestOutput]  # the engine stream, not yet metered
    timer: RequestTimer  # the request's metrics, TTFT from its body's arrival
    body: ChatRequest | CompletionRequest  # the validated body
    params: SamplingParams
    rid: str  # the response id ("chatcmpl-...", "cmpl-...", "resp_...")
    prompts: list[str | list[int]] | None  # the completion's prompts as sent (None: chat)
    prompt_ids: list[list[int]]  # per prompt its tokens, as the engine runs them
    is_cut: list[bool]  # per prompt: truncate_prompt_tokens cut it
    own: object = None  # the route's own request, where it runs as another (/v1/responses: its ResponsesRequest)


Body = ChatRequest | CompletionRequest


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What one generation route does its own way; the admission, the tokenizer, the engine, the
    metering and the client's going away are :func:`generate`'s, the same for every route."""

    # (JSON body, context) -> (validated body, prompts or None for a chat, engine params, the route's
    # own request or None); raises ParamError, RequestValidationError
    read: Callable[[object, HttpContext], tuple[Body, list | None, SamplingParams, object]]
    # (HTTP request, body, own request, engine id) -> the response id
    response_id: Callable[[Request, Body, object, str], str]
    # (started request, context) -> its shaper: ``whole(outs) -> dict`` and what ``events`` reads
    shaper: Callable[[Started, HttpContext], object]
    # (first delta, the other deltas, shaper) -> the SSE messages of a stream
    events: Callable[[RequestOutput, AsyncIterator[RequestOutput], object], AsyncIterator[str]]
    # the request field a refusal of a chat's messages names (too many, too long: render_chat)
    messages_field: str = "messages"


async def generate(ctx: HttpContext, request: Request, endpoint: Endpoint) -> Response:
    """Admit one generation request of ``endpoint`` and answer it whole or as an SSE stream.

    Raises:
        NloraError: a refusal (the app's handler answers it). RequestValidationError: a body that
            is not JSON or not a valid request. EngineError: the engine failed before the first
            token. RequestAborted: the engine aborted the request (whole responses, or before the
            first token).
    """
    caller = ctx.auth.authenticate(request.headers.items())
    # draining (503), queue and quota (429) before the body is read: a tenant's bodies in memory
    # (16 MiB each at most) are bounded by its quota and queue share, as are its prompts waiting
    # for the tokenizer; refused, a request's body is never read
    reservation = ctx.admission.reserve(caller)
    try:
        started = await _start(ctx, request, endpoint, caller, reservation)
    except BaseException:
        reservation.release()
        raise
    if started is None:  # gone before its body arrived or while its prompt waited for the tokenizer
        timer = ctx.metrics.request("http", tenant_of(ctx.auth, caller), key_of(ctx.auth, caller),
                                    request.client)
        timer.ended("cancelled")  # counted, and logged
        reservation.release()
        return Response(status_code=499)
    body = started.body
    deltas = Metered(started.stream, started.timer, reservation, body.num_choices * len(started.prompt_ids))
    try:
        shaper = endpoint.shaper(started, ctx)
    except BaseException:
        await deltas.aclose()
        raise
    if not body.stream:
        return await _whole(request, deltas, shaper)
    return await _streamed(request, deltas, shaper, endpoint.events)


async def _start(ctx: HttpContext, request: Request, endpoint: Endpoint, caller: Principal,
                 reservation: Reservation) -> Started | None:
    """Read and validate an admitted request's body, grow its ``reservation`` to its prompts x ``n``
    choices, then tokenize its prompts and queue them in the engine (:func:`_tokenize_and_queue`), or
    None when the client went away first.

    Raises:
        NloraError, RequestValidationError: see :func:`generate`.
    """
    try:
        body = await read_body(request, ctx.admission)
    except ClientDisconnect:  # gone before its body arrived: nothing to answer, nothing to log
        return None
    # TTFT from here, as vLLM's: a slow upload is not the server's time
    timer = ctx.metrics.request("http", tenant_of(ctx.auth, caller), key_of(ctx.auth, caller),
                                request.client)
    # a large body is parsed and validated in a worker thread, in pieces (body.read_off_loop)
    body, prompts, params, own = await read_off_loop(body, request.headers.get("content-type"),
                                                     grant_check(caller, ctx.base_model), endpoint.read, ctx)
    num_prompts = 1 if prompts is None else len(prompts)
    check_choices(body, params, ctx.config, num_prompts)
    truncation = truncation_of(body, ctx.engine.max_model_len)
    if truncation is not None and prompts is not None:
        check_truncatable(prompts, ctx.chat_bounds[0])
    places = body.num_choices * num_prompts
    if places > 1:  # each choice of each prompt is a request in the queue and in the tenant's counts
        asked = f"n={places}" if num_prompts == 1 else f"{num_prompts} prompts x n={body.num_choices}"
        ctx.admission.grow(reservation, places - 1, caller, asked, "n" if num_prompts == 1 else "prompt")
    engine_rid = uuid.uuid4().hex  # the engine's ids: unique whatever id the client gives
    rid = endpoint.response_id(request, body, own, engine_rid)
    timer.describe(rid, None, None, body.num_choices)  # the request log's line names it, refused or not
    queued = _tokenize_and_queue(ctx, caller, body, prompts, params, engine_rid, truncation, endpoint.messages_field)
    started = await unless_disconnected(request, queued)
    if started is not None:
        timer.describe(rid, None, started[1][0], body.num_choices)
    return None if started is None else Started(started[0], timer, body, params, rid, prompts, *started[1:], own)


async def read_body(request: Request, admission: Admission) -> bytes:
    """The request's body, read while the request holds its place; one sent encoded (gzip, ...) is
    refused before it is read.

    Raises:
        RequestValidationError: a Content-Encoding other than identity (:func:`check_content_encoding`).
        ClientDisconnect: the client went away first. BodyTimeout: it has not arrived
            :data:`BODY_READ_SECONDS` after the headers. Draining: the server began to drain first
            (a body held back would otherwise hold the shutdown for all of ``--drain-seconds``).
    """
    # every Content-Encoding line, as RFC 9110 lists a repeated field: .get() took the first only, so
    # "identity" then "gzip" let a gzip body through to "not valid JSON"
    codings = request.headers.getlist("content-encoding")
    check_content_encoding(", ".join(codings) if codings else None)
    read = await _unless(request.body(), admission.drain_started.wait(), BODY_READ_SECONDS)
    if not read.cancelled():
        return read.result()
    if admission.draining:
        raise Draining("server is shutting down and this request's body had not arrived; retry on another replica")
    raise BodyTimeout(f"the request body did not arrive within {BODY_READ_SECONDS:g} s of its headers")


async def _tokenize_and_queue(ctx: HttpContext, caller: Principal, body, prompts: list[str | list[int]] | None,
                              params, rid: str, truncation: tuple[int, str] | None = None,
                              messages_field: str = "messages") -> tuple[AsyncIterator, list[list[int]], list[bool]]:
    """Tokenize an admitted request's prompts (chat: render it; ``prompts`` None), each in its own
    turn of its tenant (TokenizerTurns; a chat's refusals name ``messages_field``), cut each to ``truncation``
    (:func:`~nlora_serve.serving.http_api.truncation.truncation_of`) and queue them in the engine
    (:func:`start_choices`); the engine stream, each prompt's token ids as they run, and whether
    truncation cut each.

    Raises:
        RequestError: a prompt (too long, a bad message), a structured-output spec that does not
            compile (:meth:`Engine.check_structured`), or from :func:`start_request`.
            AdapterNotFound: an adapter asked of a server that serves none, or not served.
    """
    turns = ctx.admission.tokenizer
    if params.structured_outputs is not None:  # compiled off the loop and the tokenizer; a bad spec is a 400 here
        await ctx.admission.grammar.run(caller.name, ctx.engine.check_structured, params.structured_outputs,
                                        caller.name)
    if prompts is None:
        full = [await turns.run(caller.name, chat_prompt, body, ctx.tokenizer, ctx.chat_bounds, messages_field)]
    else:
        full = []
        for i, prompt in enumerate(prompts):
            try:
                full.append(await turns.run(caller.name, ctx.engine.prompt_ids, prompt, body.add_special_tokens))
                # the context rule start_request applies, now: a batch's prompt that cannot run is
                # refused before the prompts after it take the tokenizer (100 texts of 160 KB: 22 s)
                fit_to_context(len(truncated(full[-1], truncation)), params, ctx.engine.max_model_len)
            except RequestError as exc:
                raise of_prompt(exc, i, len(prompts)) from None
    ids = [truncated(prompt, truncation) for prompt in full]
    adapter, salt, n = adapter_of(ctx, body.model), cache_salt_of(caller, body.cache_salt, ctx.auth), body.num_choices
    alone = n * len(ids) == 1
    # every choice of every prompt runs on the version current now, however late it is queued
    held = None if alone or adapter is None else ctx.engine.adapters.hold(adapter, n * len(ids))

    def start(index: int) -> AsyncIterator:
        engine_id = f"{caller.name}/{rid}" if alone else f"{caller.name}/{rid}/{index}"
        return start_request(ctx.engine, ids[index // n], choice_params(params, index % n), engine_id, adapter,
                             caller, salt, held)

    let_go = (lambda: ctx.engine.adapters.let_go(held)) if held is not None else None
    stream = await start_choices(start, n, len(ids), let_go)
    return stream, ids, [len(cut) < len(whole) for cut, whole in zip(ids, full)]


async def _whole(request: Request, deltas: AsyncIterator, shaper: Shaper) -> Response:
    async def collect() -> list:
        async with contextlib.aclosing(deltas):
            return [out async for out in deltas]

    outs = await unless_disconnected(request, collect())
    if outs is None:
        await deltas.aclose()  # (already, unless collect was cancelled before it began)
        return Response(status_code=499)
    # shaped and serialized on a worker thread: with prompt_logprobs a batch's response is up to
    # 1,024 prompts x max_model_len positions x 21 tokens (seconds to minutes of work, which on the
    # event loop would hold every other tenant's requests and streams)
    content = await asyncio.to_thread(lambda: whole_json(shaper.whole(outs)))
    return Response(content, media_type="application/json", headers=version_headers(outs[-1]))


async def _streamed(request: Request, deltas: AsyncIterator, shaper, events: Callable) -> Response:
    """Wait for the first delta (so an engine failure is still a proper HTTP error), then stream."""
    async def first():
        return await anext(deltas)

    out = await unless_disconnected(request, first())  # on any failure the metered stream is closed already
    if out is None:
        await deltas.aclose()  # (already, unless first was cancelled before it began)
        return Response(status_code=499)
    return EngineStreamResponse(events(out, deltas, shaper), deltas, version_headers(out))


class EngineStreamResponse(StreamingResponse):
    """An SSE response over a metered engine stream that is closed however the response ends
    (finished, client gone, server shutdown): an unfinished request is aborted at once."""

    def __init__(self, events: AsyncIterator[str], deltas: AsyncIterator, headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self._events, self._deltas = events, deltas

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._deltas.aclose()


async def unless_disconnected(request: Request, work: Awaitable):
    """``await work``, unless the client disconnects first: then ``work`` is cancelled (closing the
    engine stream it reads) and None is returned."""
    task = await _unless(work, _disconnect(request))
    return None if task.cancelled() else task.result()


async def _unless(work: Awaitable, rival: Awaitable, timeout: float | None = None) -> asyncio.Future:
    """Run ``work`` until it ends, ``rival`` ends or ``timeout`` seconds pass, whichever is first;
    ``work`` is cancelled (and awaited) in the latter cases, ``rival`` in every case. Returns
    ``work``'s task, done: cancelled, or holding its result or exception."""
    task = asyncio.ensure_future(work)
    other = asyncio.ensure_future(rival)
    try:
        await asyncio.wait((task, other), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        other.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return task


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def adapter_of(ctx: HttpContext, model: str) -> str | None:
    """The adapter a request's ``model`` names; None for the base model's served name.

    Raises:
        AdapterNotFound: an adapter asked of a server that serves none (whether a server that
            serves adapters has this one, the engine says when the request is queued).
    """
    if model == ctx.base_model:
        return None
    if adapter_versions(ctx.engine) is None:
        raise AdapterNotFound(f"model {shown(model)!r} does not exist: this server serves no adapters")
    return model


def grant_check(caller: Principal, base_model: str) -> Callable[[object], None]:
    """A parsed body's check: :func:`check_grant` of its ``model`` where that is a string (else
    the validation refuses it)."""
    def check(data) -> None:
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, str):
            check_grant(caller, model, base_model)
    return check


def check_grant(caller: Principal, model: str, base_model: str) -> None:
    """PermissionDenied unless the caller may use ``model`` (the base model's name: no adapter), in
    one wording for every name, so that a key not granted the base model cannot tell its name from
    any other."""
    if not caller.may_use(None if model == base_model else model):
        raise PermissionDenied(f"key of {caller.name!r} is not granted model {shown(model)!r}")
