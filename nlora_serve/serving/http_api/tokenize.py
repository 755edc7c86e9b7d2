"""vLLM's tokenizer endpoints over HTTP: ``POST /tokenize`` and ``POST /detokenize``, in the shapes of
vLLM's TokenizeCompletionRequest / TokenizeChatRequest / DetokenizeRequest and their responses.

- ``/tokenize`` with ``{"model", "prompt", "add_special_tokens": true}``: the tokenizer's ids of the
  text, special tokens (a BOS) added as the tokenizer adds them unless ``add_special_tokens`` is
  false: the ids ``/v1/completions`` runs for that text with the same ``add_special_tokens``
  (both default to true, as vLLM's).
- ``/tokenize`` with ``{"model", "messages", "add_generation_prompt": true}``: exactly the ids
  ``/v1/chat/completions`` runs for those messages (:func:`~nlora_serve.serving.chat_template.render_chat`:
  content text never becomes a control token) with the same ``add_generation_prompt`` (false
  leaves out the assistant's opening) and ``continue_final_message``. ``add_special_tokens``
  (true would add the tokenizer's special tokens beside the template's) is accepted at false only;
  ``tools``, ``chat_template_kwargs``, ``documents`` and ``reasoning_effort`` reach the template as
  there, vLLM's ``chat_template`` / ``mm_processor_kwargs`` are refused.
- Both answer ``{"count", "max_model_len", "tokens", "token_strs"}``; ``token_strs`` (the
  vocabulary's strings of the ids) with ``return_token_strs``, else null, as vLLM answers.
- ``/detokenize`` with ``{"model", "tokens"}`` answers ``{"prompt": tokenizer.decode(tokens)}``,
  special tokens kept (vLLM's); an id outside the tokenizer's vocabulary is a 400 naming it.

Admitted as a generation request is (http_api/generate.py), without the engine: key (401), draining
(503), queue and quota (429) before the body is read (408 when late), ``model`` granted (403)
before the other fields are validated (400), ``model`` served (404, never the base model instead),
then the tokenizer's work on the front ends' one tokenizer thread in the tenant's turn
(tokenizer_turns.py), bounded as prompts are: text over ``max_prompt_bytes``, chats over
``chat_bounds``, more ids than ``max_model_len`` (400). Refusals are not counted in
``nlora_requests_rejected_total``, which counts refused generation requests (gRPC Generate's too).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.requests import ClientDisconnect

from nlora_serve.adapters.runtime.version import AdapterNotFound
from nlora_serve.engine.api import check_prompt_text
from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.errors import shown
from nlora_serve.serving.http_api.body import read_off_loop, validated
from nlora_serve.serving.http_api.body_bounds import check_token_count, refuse_chat, refuse_detokenize
from nlora_serve.serving.http_api.context import HttpContext
from nlora_serve.serving.http_api.generate import adapter_of, grant_check, read_body, unless_disconnected
from nlora_serve.serving.http_api.openai import chat_prompt
from nlora_serve.serving.http_api.request_models import ChatMessage, ParamError, unsupported
from nlora_serve.serving.http_api.tools import Tool
from nlora_serve.serving.request_policy import shown_int
from nlora_serve.serving.stream import adapter_versions


class _Body(BaseModel):
    # extra fields are refused one by one (naming each); strict: "5" is no integer, 1 no boolean
    model_config = ConfigDict(extra="allow", strict=True)
    model: str  # an adapter name, or the base model's served name (as in /v1/completions)


class TokenizeText(_Body):
    prompt: str
    add_special_tokens: bool = True  # vLLM's default for text, and /v1/completions' (openai.py CompletionRequest)
    return_token_strs: bool | None = False


class TokenizeChat(_Body):
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # as /v1/chat/completions (needs add_generation_prompt false)
    add_special_tokens: bool = False  # false only: the chat template writes the special tokens
    return_token_strs: bool | None = False
    # the chat template's variables, as /v1/chat/completions passes them (openai.py chat_prompt)
    tools: list[Tool] | None = None
    chat_template_kwargs: dict | None = None
    documents: list[dict[str, str]] | None = None
    reasoning_effort: str | None = None


class Detokenize(_Body):
    tokens: list[int]


async def tokenize(ctx: HttpContext, request: Request) -> Response:
    """``POST /tokenize``. Raises: see :func:`_answer`."""
    return await _answer(ctx, request, _tokenize_work)


async def detokenize(ctx: HttpContext, request: Request) -> Response:
    """``POST /detokenize``. Raises: see :func:`_answer`."""
    return await _answer(ctx, request, _detokenize_work)


async def _answer(ctx: HttpContext, request: Request,
                  parse: Callable[[HttpContext, object], tuple[_Body, Callable[[], dict]]]) -> Response:
    """Admit the request, parse its body into (body, the tokenizer's work), check its model and run
    the work in the caller's turn on the tokenizer thread; its answer as JSON.

    Raises:
        NloraError: a refusal (the app's handler answers it). RequestValidationError: a body that
            is not JSON or not a valid request.
    """
    caller = ctx.auth.authenticate(request.headers.items())
    reservation = ctx.admission.reserve(caller)  # bounds a tenant's bodies and tokenizer waiters
    try:
        try:
            raw = await read_body(request, ctx.admission)
        except ClientDisconnect:
            return Response(status_code=499)
        # a large body is parsed and validated in a worker thread, in pieces (body.read_off_loop)
        body, work = await read_off_loop(raw, request.headers.get("content-type"), grant_check(caller, ctx.base_model),
                                         lambda data: parse(ctx, data))
        _check_served(ctx, body.model)
        answer = await unless_disconnected(request, ctx.admission.tokenizer.run(caller.name, work))
    finally:
        reservation.release()
    return Response(status_code=499) if answer is None else JSONResponse(answer)


def _tokenize_work(ctx: HttpContext, data) -> tuple[_Body, Callable[[], dict]]:
    """Raises: RequestValidationError, ParamError (both ``prompt`` and ``messages``, a field refused)."""
    chat = isinstance(data, dict) and "messages" in data
    if chat and "prompt" in data:
        raise ParamError("send either prompt (text) or messages (a chat), not both", "prompt")
    if chat:  # more messages than the context holds: refused before the (GIL-holding) validation
        refuse_chat(data, ctx.engine.max_model_len)
    body = validated(TokenizeChat if chat else TokenizeText, data)
    _refuse_extra(body)
    if chat and body.add_special_tokens:
        raise ParamError("add_special_tokens=true is not supported: /tokenize gives the tokens "
                         "/v1/chat/completions runs, which adds none", "add_special_tokens")
    if chat and body.continue_final_message and body.add_generation_prompt:
        raise ParamError("continue_final_message=true needs add_generation_prompt=false (as on "
                         "/v1/chat/completions)", "continue_final_message")
    return body, functools.partial(_tokenized, body, ctx.tokenizer, ctx.chat_bounds, ctx.engine.max_model_len)


def _tokenized(body: TokenizeText | TokenizeChat, tokenizer, chat_bounds: tuple[int, int],
               max_model_len: int) -> dict:
    """The /tokenize answer (on the tokenizer thread).

    Raises:
        ParamError: text over ``chat_bounds[0]`` bytes (or not Unicode), from :func:`chat_prompt`.
    """
    if isinstance(body, TokenizeChat):
        ids = chat_prompt(body, tokenizer, chat_bounds)
    else:
        try:
            check_prompt_text(body.prompt, chat_bounds[0])
        except RequestError as exc:
            raise ParamError(str(exc), "prompt") from None
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def _detokenize_work(ctx: HttpContext, data) -> tuple[_Body, Callable[[], dict]]:
    """Raises: RequestValidationError, ParamError (a field refused, more ids than max_model_len)."""
    refuse_detokenize(data, ctx.engine.max_model_len)  # before the (GIL-holding) validation of millions of ids
    body = validated(Detokenize, data)
    _refuse_extra(body)
    check_token_count(len(body.tokens), ctx.engine.max_model_len)
    return body, functools.partial(_detokenized, body.tokens, ctx.tokenizer)


def _detokenized(ids: list[int], tokenizer) -> dict:
    """The /detokenize answer (on the tokenizer thread).

    Raises:
        ParamError: an id outside ``[0, len(tokenizer))``, which the tokenizer would decode to nothing.
    """
    size = len(tokenizer)
    bad = next((i for i, token in enumerate(ids) if not 0 <= token < size), None)
    if bad is not None:
        raise ParamError(f"tokens[{bad}] = {shown_int(ids[bad])} is not a token id of this model's "
                         f"tokenizer: ids are in [0, {size})", "tokens")
    return {"prompt": tokenizer.decode(ids)}


def _refuse_extra(body: _Body) -> None:
    """Raises ParamError for the first field this server does not implement."""
    for field in body.model_extra or {}:
        raise unsupported(field)


def _check_served(ctx: HttpContext, model: str) -> None:
    """Refuse a model this server does not serve, as /v1/completions refuses it (no engine asked).

    Raises:
        AdapterNotFound: no adapter of that name (never the base model instead).
    """
    adapter = adapter_of(ctx, model)
    if adapter is not None and adapter not in {version.name for version in adapter_versions(ctx.engine)}:
        raise AdapterNotFound(f"adapter {shown(adapter)!r} is not registered")
