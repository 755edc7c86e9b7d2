"""``POST /v1/responses`` (OpenAI's Responses API: text, function tool calls, logprobs) as a generation route of
:func:`~nlora_serve.serving.http_api.generate.generate`: admitted, granted, metered and run as the
equivalent /v1/chat/completions request (http_api/responses_request.py), answered in the Responses
API's objects (http_api/responses_shape.py)."""

from __future__ import annotations

from fastapi import Request

from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.context import HttpContext
from nlora_serve.serving.http_api.generate import Endpoint
from nlora_serve.serving.http_api.openai import MAX_REQUEST_ID, chat_params
from nlora_serve.serving.http_api.openai_route import shaper_of
from nlora_serve.serving.http_api.request_models import ChatRequest, ParamError
from nlora_serve.serving.http_api.responses_chat import chat_body_of, chat_params_of
from nlora_serve.serving.http_api.responses_request import ResponsesRequest, check_stateless, check_turns
from nlora_serve.serving.http_api.responses_shape import ResponseShaper, random_id


def _read(data, ctx: HttpContext) -> tuple[ChatRequest, None, SamplingParams, ResponsesRequest]:
    """The request, its chat request and engine params (raises ParamError, ResponseNotFound,
    RequestValidationError naming the field)."""
    check_turns(data, ctx.chat_bounds[1], ctx.chat_bounds[0])
    request = validated(ResponsesRequest, data)
    check_stateless(request)
    if request.request_id is not None and len(request.request_id) > MAX_REQUEST_ID:
        raise ParamError(f"request_id is {len(request.request_id)} characters; at most {MAX_REQUEST_ID}",
                         "request_id")
    body = validated(ChatRequest, chat_body_of(request, ctx.config.auto_tool_parser is not None))
    return body, None, chat_params_of(chat_params, body, request, ctx.config), request


def _response_id(http: Request, body: ChatRequest, request: ResponsesRequest, engine_rid: str) -> str:
    """vLLM's: the body's ``request_id`` as it is (checked in :func:`_read`), else ``resp_<16 hex>``."""
    return request.request_id if request.request_id is not None else f"resp_{random_id()}"


def _shaper(started, ctx: HttpContext) -> ResponseShaper:
    # the chat body sets no max_tokens: start_request lowers the limit to the rest of the context
    limit = min(started.params.max_tokens, ctx.engine.max_model_len - len(started.prompt_ids[0]))
    body: ChatRequest = started.body
    # the chat request's own Shaper writes the logprobs
    auto = ctx.config.auto_tool_parser
    chat = (shaper_of(started.rid, body, started.params, ctx.tokenizer, started.prompt_ids, None, ctx.token_text,
                      auto) if body.logprobs else None)
    return ResponseShaper(started.rid, started.own, started.params, limit, chat, body.tool_calls(auto)[0])


RESPONSES = Endpoint(_read, _response_id, _shaper, lambda first, deltas, shaper: shaper.events(first, deltas),
                     messages_field="input")  # its messages are input's (and instructions')
