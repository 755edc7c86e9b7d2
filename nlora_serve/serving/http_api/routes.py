"""The OpenAI-compatible HTTP API (FastAPI) over the same engine, keys, admission and metrics as
the gRPC front end (DESIGN §6).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /v1/responses`` (OpenAI's
Responses API for text, stateless: http_api/responses_route.py) (whole or SSE-streamed),
``GET /v1/models`` (the base model and the adapters this key may use) and ``GET /v1/models/{model}``
(one of them; 404 for a name it may not use, as for one that does not exist), ``GET /health``,
``GET /metrics`` (Prometheus, no key: as vLLM serves it on its API port; with --tenant-metrics the
per-tenant counters name the tenants of the tenants file, see serving/metrics.py),
vLLM's ``POST /tokenize``, ``POST /detokenize`` (http_api/tokenize.py) and ``GET /version``, and, with
``--allow-runtime-lora-updating``, vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (http_api/lora_admin.py, admin keys only).

Every refusal is counted in ``nlora_requests_rejected_total{frontend="http"}`` (generation
routes only) and answered in OpenAI's error shape (context.error_body); generation itself,
from admission to the SSE stream, is http_api/generate.py.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from nlora_serve import __version__
from nlora_serve.adapters.runtime.version import AdapterNotFound
from nlora_serve.engine.api import EngineError, RequestAborted
from nlora_serve.errors import NloraError, shown
from nlora_serve.serving.auth import Principal
from nlora_serve.serving.health_state import health_answer
from nlora_serve.serving.metrics import caller_of_key
from nlora_serve.serving.stream import adapter_versions
from nlora_serve.serving.status import Draining, http_status_of
from nlora_serve.serving.http_api.context import HttpContext, aborted_body, error_body
from nlora_serve.serving.http_api.generate import generate
from nlora_serve.serving.http_api.openai_route import CHAT, COMPLETIONS
from nlora_serve.serving.http_api.lora_admin import load_lora_adapter, unload_lora_adapter
from nlora_serve.serving.http_api.responses_route import RESPONSES
from nlora_serve.serving.http_api.tokenize import detokenize, tokenize

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
LORA_ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


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


# a draining server's 503 closes the connection (uvicorn closes it after the answer): a client's
# retry (the openai SDK retries a 503 twice) opens a new one, which a load balancer can send to
# another replica; on the kept-alive connection every retry came back to this server
DRAINING_HEADERS = {"Connection": "close"}


@_router.get("/health")
async def _health(request: Request) -> JSONResponse:
    ctx = _ctx(request)  # dead: the server is on its way out (commands/serve.py); see health_state.py
    status, body = health_answer(ctx.engine.dead_reason, ctx.admission.draining)
    return JSONResponse(body, status_code=status,
                        headers=DRAINING_HEADERS if body["status"] == "draining" else None)


@_router.get("/metrics")
async def _metrics(request: Request) -> Response:
    body, content_type = await _ctx(request).metrics.scrape()  # off the loop: metrics_scrape.py
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
    return await generate(_ctx(request), request, COMPLETIONS)


@_router.post("/v1/chat/completions")
async def _chat_completions(request: Request) -> Response:
    return await generate(_ctx(request), request, CHAT)


@_router.post("/v1/responses")  # OpenAI's Responses API, text only: run as a chat request (responses_route.py)
async def _responses(request: Request) -> Response:
    return await generate(_ctx(request), request, RESPONSES)


@_router.post("/tokenize")  # vLLM's extras: tokenizer only, admitted as generation is (tokenize.py)
async def _tokenize(request: Request) -> Response:
    return await tokenize(_ctx(request), request)


@_router.post("/detokenize")
async def _detokenize(request: Request) -> Response:
    return await detokenize(_ctx(request), request)


@_router.post("/v1/load_lora_adapter")  # vLLM's runtime adapter loading: admin keys, off by default
async def _load_lora_adapter(request: Request) -> Response:
    return await load_lora_adapter(_ctx(request), request)


@_router.post("/v1/unload_lora_adapter")
async def _unload_lora_adapter(request: Request) -> Response:
    return await unload_lora_adapter(_ctx(request), request)


@_router.get("/version")
async def _version(caller: Principal = Depends(_principal)) -> dict:  # a key, as every route that is no probe
    return {"version": __version__}


def _refused(request: Request, reason: str, message: str | None = None) -> None:
    if request.url.path in GENERATE_PATHS:  # as gRPC counts Generate refusals only
        ctx = _ctx(request)
        tenant, key = caller_of_key(ctx.auth, request.headers.items()) if ctx.metrics.wants_tenant else (None, None)
        ctx.metrics.reject(reason, "http", tenant, message, client=request.client, key=key)


async def _expected(request: Request, exc: NloraError) -> JSONResponse:
    status, reason = http_status_of(exc)
    _refused(request, reason, str(exc))
    message, param = str(exc), getattr(exc, "param", None)
    if isinstance(exc, AdapterNotFound) and request.url.path not in LORA_ADMIN_PATHS:  # those name no 'model'
        message += _not_found_hint(_ctx(request), request)
        param = "model"  # as vLLM 0.32's 404 for an unknown model names it
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if isinstance(exc, Draining):
        headers = DRAINING_HEADERS
    return JSONResponse(error_body(message, status, param, reason), status, headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    _refused(request, "invalid_argument", f"{first.get('type')} at {first.get('loc')}")
    if first.get("type") == "json_invalid":  # loc is ("body", <character offset>)
        at = first.get("loc", ("body", "?"))[-1]
        return JSONResponse(error_body(f"request body is not valid JSON (at character {at})", 400, None,
                                       "invalid_argument"), 400)
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = _located(where, str(first.get("msg")))
    # vLLM runs its base model without one; the openai SDK's model=None sends null, which means the same
    no_model = first.get("type") == "missing" or ("input" in first and first["input"] is None)
    if where == "model" and no_model:
        message += " (vLLM's default of the base model does not apply here)" + _not_found_hint(_ctx(request), request)
    return JSONResponse(error_body(message, 400, where or None, "invalid_argument"), 400)


def _located(where: str, message: str) -> str:
    """A validation error's message after its field, ``where`` (``"body"`` when none; cut, see
    :func:`~nlora_serve.errors.shown`: it holds the client's keys, e.g. an unknown field's): one that
    names it first already ("prompt[0] is empty: ...", "input[1].role: ...") is not prefixed again."""
    after = message[len(where):len(where) + 1]  # "prompt_logprobs ..." names another field than "prompt"
    if where and message.startswith(where) and not (after.isalnum() or after == "_"):
        return message
    return f"{shown(where) or 'body'}: {message}"


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code)  # every error body carries a code
    if exc.status_code == 413:  # a body over the limit: counted under the code its body gives
        _refused(request, code, str(exc.detail))
    message = str(exc.detail)
    if exc.status_code == 404 and "endpoint" not in request.scope:  # no route matched (Starlette's bare 404)
        served = ", ".join(f"{method} {route.path.replace(':path', '')}" for route in _router.routes
                           for method in sorted(route.methods))
        message = f"no endpoint {request.method} {shown(request.url.path)}; this server serves {served}"
    elif exc.status_code == 405 and exc.headers and "Allow" in exc.headers:  # a route of another method
        message = f"{request.method} {shown(request.url.path)}: this endpoint takes {exc.headers['Allow']}"
    return JSONResponse(error_body(message, exc.status_code, code=code), exc.status_code, exc.headers)


async def _engine_failed(request: Request, exc: EngineError) -> JSONResponse:
    return JSONResponse(error_body(str(exc), 500, code="engine_error"), 500)


async def _aborted(request: Request, exc: RequestAborted) -> JSONResponse:
    return JSONResponse(aborted_body(exc), http_status_of(exc)[0])  # admitted: not a refusal


_ERROR_HANDLERS = {NloraError: _expected, RequestValidationError: _invalid, HTTPException: _http_error,
                   EngineError: _engine_failed, RequestAborted: _aborted}


def _model_entries(ctx: HttpContext, caller: Principal) -> list[dict]:
    """/v1/models entries this caller may use: the base model (no parent), then the adapters, whose
    parent is the base model's name only for a caller granted the base model (gRPC's
    GetServerInfo hides the name from the others too); each with vLLM's ``max_model_len``."""
    names = [v.name for v in adapter_versions(ctx.engine) or []]
    base = caller.may_use(None)
    entries = [(ctx.base_model, None)] if base else []
    entries += [(name, ctx.base_model if base else None) for name in names
                if caller.may_use(name) and name != ctx.base_model]
    return [{"id": name, "object": "model", "created": ctx.started, "owned_by": "nlora-serve", "parent": parent,
             "max_model_len": ctx.engine.max_model_len} for name, parent in entries]


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
