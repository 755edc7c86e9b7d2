"""Engine outputs -> OpenAI Responses API objects (``POST /v1/responses``), as vLLM 0.32 writes
them without tool or reasoning parsers (no I/O).

A whole response is vLLM's ``ResponsesResponse.model_dump()``: status ``completed``, or
``incomplete`` with ``incomplete_details: {"reason": "max_output_tokens"}`` when the limit cut it;
``output`` one assistant ``message`` item (``content`` one ``output_text`` part, ``[]`` when no
text came); the request's settings echoed with the values it ran with (temperature, top_p,
penalties, the effective ``max_output_tokens``); ``usage`` with the prompt tokens read from the
prefix cache as ``cached_tokens``. A stream is vLLM's SSE events (``event: <type>`` and
``data: <json>``, no ``[DONE]``), numbered by ``sequence_number`` from 0: ``response.created``,
``response.in_progress``, then, from the first delta with text, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per delta with text, and
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``; last
``response.completed`` (whose ``output`` is the streamed item, or ``[]`` when no text came). Ids
are vLLM's: ``resp_<16 hex>`` (or the body's ``request_id``), ``msg_<16 hex>``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from nlora_serve.engine.api import EngineError, RequestAborted, RequestOutput
from nlora_serve.engine.sampling import SamplingParams
from nlora_serve.serving.http_api.responses_request import REASONING_KEYS, ResponsesRequest
from nlora_serve.serving.status import http_status_of

# vLLM 0.32's ResponsesResponse fields this server never fills (vLLM's without a store, tools, harmony)
_NULLS = {"kv_transfer_params": None, "ec_transfer_params": None, "input_messages": None, "output_messages": None}


def random_id() -> str:
    """vLLM's ``random_uuid()``: 16 hex digits."""
    return uuid.uuid4().hex[:16]


def event_sse(event: dict) -> str:
    """One SSE message of a Responses stream, as vLLM's ``_convert_stream_to_sse_events``."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"


def text_part(text: str, logprobs: list | None = None) -> dict:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict:
    """An assistant message item: ``text`` None (an item just added) or "" has no content part."""
    return {"id": item_id, "content": [text_part(text)] if text else [], "role": "assistant", "status": status,
            "type": "message", "phase": None}


class ResponseShaper:
    """The Responses API objects of one request.

    Args:
        response_id: the response ``id`` (``resp_...``).
        request: the validated request (its settings are echoed).
        params: the engine's sampling params of the request (temperature, top_p, penalties echoed).
        max_output_tokens: the limit the request runs with (the rest of the context when unset).
    """

    def __init__(self, response_id: str, request: ResponsesRequest, params: SamplingParams, max_output_tokens: int):
        self.response_id, self.request, self.params = response_id, request, params
        self.max_output_tokens = max_output_tokens
        self.created_at = int(time.time())
        self._sequence = 0

    def response(self, status: str, output: list[dict], last: RequestOutput | None) -> dict:
        """The ``response`` object (vLLM's ``ResponsesResponse.from_request``); usage from ``last``
        (the finished delta), None before it."""
        request, params = self.request, self.params
        text = None
        if request.text is not None:
            fmt = request.text.format
            text = {"format": None if fmt is None else _format(fmt), "verbosity": request.text.verbosity}
        reasoning = None
        if request.reasoning is not None:
            reasoning = {key: getattr(request.reasoning, key) for key in REASONING_KEYS}
        return {"id": self.response_id, "created_at": self.created_at,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": request.instructions, "metadata": request.metadata, "model": request.model,
                "object": "response", "output": output,
                "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
                "temperature": params.temperature, "tool_choice": "none", "tools": [], "top_p": params.top_p,
                "background": False, "max_output_tokens": self.max_output_tokens,
                "max_tool_calls": request.max_tool_calls, "previous_response_id": None, "prompt": None,
                "reasoning": reasoning, "service_tier": request.service_tier, "status": status, "text": text,
                "top_logprobs": None, "truncation": request.truncation or "disabled",
                "usage": None if last is None else _usage(last), "user": request.user,
                "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty, **_NULLS}

    def whole(self, outs: list[RequestOutput]) -> dict:
        """The non-streaming response of a request's deltas (the last one finished)."""
        text = "".join(out.text for out in outs)
        return self.response(_status(outs[-1]), [message_item(f"msg_{random_id()}", text)], outs[-1])

    async def events(self, first: RequestOutput, deltas: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """The SSE messages of a stream whose first delta is ``first`` and the rest ``deltas``; an
        engine failure or abort after the first delta ends it with OpenAI's ``error`` event."""
        opening = self.response("in_progress", [], None)
        yield self._event("response.created", response=opening)
        yield self._event("response.in_progress", response=opening)
        item_id, text, last = None, "", first
        where = {"content_index": 0, "output_index": 0}
        try:
            async for last in _with_first(first, deltas):
                if not last.text:
                    continue
                if item_id is None:
                    item_id = f"msg_{random_id()}"
                    yield self._event("response.output_item.added", item=message_item(item_id, None, "in_progress"),
                                      output_index=0)
                    yield self._event("response.content_part.added", **where, item_id=item_id,
                                      part=text_part("", []))
                text += last.text
                yield self._event("response.output_text.delta", **where, delta=last.text, item_id=item_id,
                                  logprobs=[])
        except (EngineError, RequestAborted) as exc:  # headers are sent: reported in-band
            code = "engine_error" if isinstance(exc, EngineError) else http_status_of(exc)[1]
            yield self._event("error", code=code, message=str(exc), param=None)
            return
        output = []
        if item_id is not None:
            yield self._event("response.output_text.done", **where, item_id=item_id, logprobs=[], text=text)
            yield self._event("response.content_part.done", **where, item_id=item_id, part=text_part(text))
            output = [message_item(item_id, text)]
            yield self._event("response.output_item.done", item=output[0], output_index=0)
        yield self._event("response.completed", response=self.response(_status(last), output, last))

    def _event(self, kind: str, **fields) -> str:
        event = {**fields, "sequence_number": self._sequence, "type": kind}
        self._sequence += 1
        return event_sse(event)


async def _with_first(first: RequestOutput, deltas: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for out in deltas:
        yield out


def _status(last: RequestOutput) -> str:
    return "incomplete" if last.finish_reason == "length" else "completed"


def _usage(last: RequestOutput) -> dict:
    """vLLM 0.32's ResponseUsage of a one-turn request (per-turn lists empty, as its SimpleContext)."""
    return {"input_tokens": last.prompt_tokens,
            "input_tokens_details": {"cached_tokens": last.cached_tokens, "cache_write_tokens": 0,
                                     "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
            "output_tokens": last.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0, "output_tokens_per_turn": [],
                                      "tool_output_tokens_per_turn": []},
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def _format(fmt) -> dict:
    """``text.format`` as vLLM echoes it (OpenAI's format types dumped)."""
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    return {"name": fmt.name, "schema": fmt.schema_, "type": fmt.type, "description": fmt.description,
            "strict": fmt.strict}
