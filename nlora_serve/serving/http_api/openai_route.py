"""The OpenAI routes ``POST /v1/completions`` and ``POST /v1/chat/completions`` as generation
routes of :func:`~nlora_serve.serving.http_api.generate.generate` (admission, tokenizer, engine and
metering are its): how each reads its body (http_api/openai.py, request_models.py), names its
response, and shapes its answer, whole or as chunks (http_api/responses.py)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from nlora_serve.engine.api import EngineError, RequestAborted
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.body_bounds import refuse_chat, refuse_completion, refuse_sampling_counts
from nlora_serve.serving.http_api.context import HttpContext, aborted_body, error_body
from nlora_serve.serving.http_api.echo import Echo
from nlora_serve.serving.http_api.generate import Body, Endpoint, Started
from nlora_serve.serving.http_api.openai import chat_params, completion_inputs, logprobs_asked, response_id_of
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest
from nlora_serve.serving.http_api.responses import Shaper, sse
from nlora_serve.serving.http_api.token_bytes import TokenText


def _read_openai(data, ctx: HttpContext, chat: bool) -> tuple[Body, list | None, SamplingParams, None]:
    """A chat or completion body, validated, with its prompts (None: a chat) and engine params."""
    if chat:  # counts no request can serve, refused before the (GIL-holding) validation
        refuse_chat(data, ctx.engine.max_model_len)
    else:
        refuse_completion(data, ctx.config.max_queue)
    refuse_sampling_counts(data)
    body = validated_openai(data, chat)
    prompts, params = (None, chat_params(body, ctx.config)) if chat else completion_inputs(body, ctx.config)
    return body, prompts, params, None


# chat -> the field the endpoint needs, the other endpoint's field, and where a body with that one goes
_OTHER_ENDPOINT = {False: ("prompt", "messages", "a chat's field: send chats to POST /v1/chat/completions (this "
                                                 "endpoint takes a 'prompt')"),
                   True: ("messages", "prompt", "a completion's field: send raw-text prompts to POST /v1/completions "
                                                "(this endpoint takes 'messages')")}


def validated_openai(data, chat: bool) -> Body:
    """``data`` validated as a ChatRequest (``chat``) or a CompletionRequest (:func:`validated`); a
    body of the other endpoint (a chat's ``messages`` sent to /v1/completions, a ``prompt`` to
    /v1/chat/completions) is refused first for the field it lacks, with where it belongs: h130 met a
    bare "prompt: Field required" (vLLM: "Either prompt or prompt_embeds must be provided", param prompt).

    Raises:
        RequestValidationError: as :func:`validated`'s, that one first.
    """
    try:
        return validated(ChatRequest if chat else CompletionRequest, data)
    except RequestValidationError as exc:
        needed, sent, where = _OTHER_ENDPOINT[chat]
        errors = list(exc.errors())
        missing = next((e for e in errors if e.get("type") == "missing" and tuple(e.get("loc", ())) == (needed,)), None)
        if missing is None or sent not in data:
            raise
        hinted = {**missing, "msg": f"{missing.get('msg')}; '{sent}' is {where}"}
        raise RequestValidationError([hinted, *(e for e in errors if e is not missing)]) from None


def _openai_id(chat: bool) -> Callable[[Request, Body, object, str], str]:
    def response_id(request: Request, body: Body, own, engine_rid: str) -> str:
        # vLLM's response id: the X-Request-Id header, else the body's request_id, else a random one
        given = response_id_of(request.headers.get("x-request-id"), body)
        return f"{'chatcmpl' if chat else 'cmpl'}-{given or engine_rid}"
    return response_id


def _openai_shaper(started: Started, ctx: HttpContext) -> Shaper:
    return shaper_of(started.rid, started.body, started.params, ctx.tokenizer, started.prompt_ids,
                     _echo(started, ctx.tokenizer), ctx.token_text, ctx.config.auto_tool_parser)


def shaper_of(rid: str, body: ChatRequest | CompletionRequest, params: SamplingParams, tokenizer,
              prompt_ids: list[list[int]], echo: list[Echo] | None, token_text: TokenText | None = None,
              auto_parser: str | None = None) -> Shaper:
    """The :class:`Shaper` of a validated request ``body`` with the engine ``params`` it runs with
    (the prompt scored to ``params.prompt_logprobs``), response id ``rid``, per prompt its tokens
    ``prompt_ids`` and what ``echo`` puts first (:func:`_echo`); ``auto_parser``: the server's
    parser of tool_choice "auto" (ServerConfig.auto_tool_parser).

    Raises:
        RequestError: the body's tools (checked already where the request was refused before).
    """
    chat = isinstance(body, ChatRequest)
    return Shaper(rid, body.model, chat, tokenizer, logprobs_asked(body), bool(body.return_tokens_as_token_ids),
                  body.include_usage, body.continuous_usage, n=body.num_choices, prompt_ids=prompt_ids, echo=echo,
                  prompt_logprobs=params.prompt_logprobs, token_text=token_text,
                  tools=body.tool_calls(auto_parser)[0] if chat else None, token_ids=bool(body.return_token_ids),
                  logprob_token_ids=bool(body.logprob_token_ids))


def _echo(started: Started, tokenizer) -> list[Echo] | None:
    """What an ``echo=true`` completion puts first, per prompt: the prompt as sent; token ids, or a
    text cut by truncate_prompt_tokens, as its ids that run decoded (vLLM echoes a cut text whole,
    beside the logprobs of the kept tokens only)."""
    body = started.body
    if not getattr(body, "echo", False):
        return None
    return [Echo(prompt if isinstance(prompt, str) and not cut else tokenizer.decode(ids),
                 prompt_only=body.max_tokens == 0)
            for prompt, ids, cut in zip(started.prompts, started.prompt_ids, started.is_cut)]


async def _events(first, deltas: AsyncIterator, shaper: Shaper) -> AsyncIterator[str]:
    """SSE messages: (chat: the role chunk of each choice), one chunk per delta (but those of
    :meth:`Shaper.chunk` None), (the usage chunk), [DONE]."""
    for opening in shaper.opening_chunks(first):
        yield sse(opening)
    try:
        if (chunk := shaper.chunk(first)) is not None:
            yield sse(chunk)
        async for out in deltas:  # to the last choice's finished delta
            if (chunk := shaper.chunk(out)) is not None:  # None: a delta vLLM sends no chunk for
                yield sse(chunk)
    except EngineError as exc:  # headers are sent: report in-band, as OpenAI-compatible servers do
        yield sse(error_body(str(exc), 500, code="engine_error"))
        return
    except RequestAborted as exc:
        yield sse(aborted_body(exc))
        return
    if shaper.include_usage:
        yield sse(shaper.usage_chunk())
    yield sse("[DONE]")


CHAT = Endpoint(functools.partial(_read_openai, chat=True), _openai_id(True), _openai_shaper, _events)
COMPLETIONS = Endpoint(functools.partial(_read_openai, chat=False), _openai_id(False), _openai_shaper, _events)
