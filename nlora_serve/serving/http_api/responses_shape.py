"""Engine outputs -> OpenAI Responses API objects (``POST /v1/responses``), as vLLM 0.32 writes
them with a JSON tool-call parser for "required" / named tool choices, with the server's
``--tool-call-parser`` for "auto" (``--enable-auto-tool-choice``), and without one otherwise
(no I/O).

A whole response is vLLM's ``ResponsesResponse.model_dump(by_alias=True)``: status ``completed``,
or ``incomplete`` with ``incomplete_details: {"reason": "max_output_tokens"}`` when the limit cut
it; ``output`` one assistant ``message`` item (``content`` one ``output_text`` part, ``[]`` when no
text came; the part's ``logprobs`` chat's logprobs entries when included, else null) or, for
"required" / a named function, one ``function_call`` item per call ("auto": after a message item
of the text outside the calls, when there is some) (``{"arguments", "call_id",
"name", "type", "id", "async", "caller", "namespace", "status"}``, ``fc_<16 hex>``, the call id
chat's, none when the text holds no call); the request's settings echoed with the values it ran
with (temperature, top_p, penalties, the effective ``max_output_tokens``, ``tool_choice``, ``tools``,
``top_logprobs``); ``usage`` with the prompt tokens read from the prefix cache as
``cached_tokens``. A stream is vLLM's SSE events (``event: <type>`` and ``data: <json>``, no
``[DONE]``), numbered by ``sequence_number`` from 0: ``response.created``,
``response.in_progress``; then for text, from the first delta with text,
``response.output_item.added``, ``response.content_part.added``, one ``response.output_text.delta``
per delta with text (its ``logprobs`` the entries without ``bytes``), and
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``; for
tool calls, per call ``response.output_item.added`` (``arguments`` ``""``, ``in_progress``), one
``response.function_call_arguments.delta`` per delta that grows its arguments,
``response.function_call_arguments.done`` and ``response.output_item.done``; last
``response.completed`` (whose ``output`` is the streamed items). Ids are vLLM's: ``resp_<16 hex>``
(or the body's ``request_id``), ``msg_<16 hex>``, ``fc_<16 hex>``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from nlora_serve.engine.api import EngineError, RequestAborted, RequestOutput
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.serving.http_api.responses import Shaper, tool_stream
from nlora_serve.serving.http_api.responses_chat import tools_echo
from nlora_serve.serving.http_api.responses_request import REASONING_KEYS, ResponsesRequest
from nlora_serve.serving.http_api.tool_parsers import AutoStream, auto_answer
from nlora_serve.serving.http_api.tool_stream import NamedStream
from nlora_serve.serving.http_api.tools import ToolCalls, whole_calls
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


def message_item(item_id: str, text: str | None, status: str = "completed", logprobs: list | None = None) -> dict:
    """An assistant message item: ``text`` None (an item just added) or "" has no content part."""
    return {"id": item_id, "content": [text_part(text, logprobs)] if text else [], "role": "assistant",
            "status": status, "type": "message", "phase": None}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    """A ``function_call`` output item (OpenAI's ResponseFunctionToolCall dumped by alias, as vLLM
    0.32 writes it)."""
    return {"arguments": arguments, "call_id": call_id, "name": name, "type": "function_call", "id": item_id,
            "async": None, "caller": None, "namespace": None, "status": status}


def stream_logprobs(entries: list[dict]) -> list[dict]:
    """An ``output_text.delta`` event's logprobs: the entries without their ``bytes`` (vLLM's
    ``_to_stream_logprobs``)."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]}
            for e in entries]


class ResponseShaper:
    """The Responses API objects of one request.

    Args:
        response_id: the response ``id`` (``resp_...``).
        request: the validated request (its settings are echoed).
        params: the engine's sampling params of the request (temperature, top_p, penalties echoed).
        max_output_tokens: the limit the request runs with (the rest of the context when unset).
        chat: the chat :class:`Shaper` of the chat request it runs as, whose logprobs entries an
            ``output_text`` part's are; None: logprobs not included.
        tools: the output returns as ``function_call`` items ("required" or a named function,
            http_api/tools.py; "auto": those its parser finds, after a message of the other text);
            None: as a message.
    """

    def __init__(self, response_id: str, request: ResponsesRequest, params: SamplingParams, max_output_tokens: int,
                 chat: Shaper | None = None, tools: ToolCalls | None = None):
        self.response_id, self.request, self.params = response_id, request, params
        self.max_output_tokens = max_output_tokens
        self.chat, self.tools = chat, tools
        self.created_at = int(time.time())
        self._sequence = 0
        self._calls = None if tools is None else tool_stream(tools)
        self._open: dict | None = None  # a stream's item being streamed: its output_item.done's item
        self._logprobs: list[dict] = []  # ... a message's logprobs so far
        self._output: list[dict] = []  # a stream's items done
        self._tools_echo = tools_echo(request)  # once: a stream writes 3 response objects

    def response(self, status: str, output: list[dict], last: RequestOutput | None) -> dict:
        """The ``response`` object (vLLM's ``ResponsesResponse.from_request``); usage from ``last``
        (the finished delta), None before it."""
        request, params = self.request, self.params
        text = None
        if request.text is not None:
            fmt = request.text.format
            text = {"format": None if fmt is None else _format(fmt), "verbosity": request.text.verbosity}
        reasoning = None
        tool_choice, tools = self._tools_echo
        if request.reasoning is not None:
            reasoning = {key: getattr(request.reasoning, key) for key in REASONING_KEYS}
        return {"id": self.response_id, "created_at": self.created_at,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": request.instructions, "metadata": request.metadata, "model": request.model,
                "object": "response", "output": output,
                "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
                "temperature": params.temperature, "tool_choice": tool_choice, "tools": tools, "top_p": params.top_p,
                "background": False, "max_output_tokens": self.max_output_tokens,
                "max_tool_calls": request.max_tool_calls, "previous_response_id": None, "prompt": None,
                "reasoning": reasoning, "service_tier": request.service_tier, "status": status, "text": text,
                "top_logprobs": request.top_logprobs or 0 if request.logprobs_included else None,
                "truncation": request.truncation or "disabled",
                "usage": None if last is None else _usage(last), "user": request.user,
                "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty, **_NULLS}

    def whole(self, outs: list[RequestOutput]) -> dict:
        """The non-streaming response of a request's deltas (the last one finished): its tool calls
        as ``function_call`` items (none when the text holds none), else one message item whose
        text part has the tokens' logprobs when included (vLLM's ``_make_response_output_items``)."""
        text = "".join(out.text for out in outs)
        logprobs = None if self.chat is None else [e for out in outs for e in self.chat.content_logprobs(out)]
        if self.tools is not None and self.tools.parser is not None:  # "auto": vLLM's build_response_output_items
            calls, content = auto_answer(self.tools, text)
            output = [message_item(f"msg_{random_id()}", content, logprobs=logprobs)] if content else []
            output += [call_item(f"fc_{random_id()}", call["id"], call["function"]["name"],
                                 call["function"]["arguments"]) for call in calls]
        elif self.tools is not None:
            output = [call_item(f"fc_{random_id()}", call["id"], call["function"]["name"],
                                call["function"]["arguments"]) for call in whole_calls(self.tools, text)]
        else:
            output = [message_item(f"msg_{random_id()}", text, logprobs=logprobs)]
        return self.response(_status(outs[-1]), output, outs[-1])

    async def events(self, first: RequestOutput, deltas: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """The SSE messages of a stream whose first delta is ``first`` and the rest ``deltas``; an
        engine failure or abort after the first delta ends it with OpenAI's ``error`` event."""
        opening = self.response("in_progress", [], None)
        yield self._event("response.created", response=opening)
        yield self._event("response.in_progress", response=opening)
        last = first
        try:
            async for last in _with_first(first, deltas):
                for event in self._text_events(last) if self.tools is None else self._call_events(last):
                    yield event
        except (EngineError, RequestAborted) as exc:  # headers are sent: reported in-band
            code = "engine_error" if isinstance(exc, EngineError) else http_status_of(exc)[1]
            yield self._event("error", code=code, message=str(exc), param=None)
            return
        for event in self._close():
            yield event
        yield self._event("response.completed", response=self.response(_status(last), self._output, last))

    def _text_events(self, out: RequestOutput, text: str | None = None) -> list[str]:
        """A text delta's events (none without text, as vLLM): the message opened at the first.
        ``text``: the part of ``out``'s text that is content ("auto"'s parser's; logprobs go with
        the delta's whole text only)."""
        whole = text is None or text == out.text
        text = out.text if text is None else text
        if not text:
            return []
        events = []
        if self._open is None:
            self._open = message_item(f"msg_{random_id()}", "")
            events.append(self._event("response.output_item.added", output_index=len(self._output),
                                      item=message_item(self._open["id"], None, "in_progress")))
            events.append(self._event("response.content_part.added", **self._where(), part=text_part("", [])))
        entries = [] if self.chat is None or not whole else self.chat.content_logprobs(out)
        self._logprobs += entries
        self._open["content"] = [text_part(self._text() + text)]
        events.append(self._event("response.output_text.delta", **self._where(), delta=text,
                                  logprobs=stream_logprobs(entries)))
        return events

    def _call_events(self, out: RequestOutput) -> list[str]:
        """A delta's tool-call events (vLLM's SimpleStreamingEventProcessor on its tool parser's
        deltas): a call's item opened when it is announced (the one before it done), then its
        argument text as ``function_call_arguments.delta``."""
        finished = out.finish_reason is not None
        if isinstance(self._calls, AutoStream):  # "auto": text outside the calls is a message's
            calls = self._calls.delta(out.text, finished) if out.text or finished else {}
        else:
            calls = self._calls.delta(out.text) if out.text or isinstance(self._calls, NamedStream) else {}
        events = self._text_events(out, calls["content"]) if calls.get("content") else []
        for call in calls.get("tool_calls", []):
            if not self.tools.parallel and call["index"] != 0:
                continue  # vLLM's maybe_filter_parallel_tool_calls
            if "id" in call:  # announced: a new item (the one before it done)
                events += self._close()
                self._open = call_item(f"fc_{random_id()}", call["id"], call["function"]["name"], "", "in_progress")
                events.append(self._event("response.output_item.added", output_index=len(self._output),
                                          item=dict(self._open)))
            arguments = call["function"].get("arguments")  # "auto"'s announcing entry has none
            if arguments:
                self._open["arguments"] += arguments
                events.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                          output_index=len(self._output), delta=arguments))
        return events

    def _close(self) -> list[str]:
        """The events that finish the item being streamed (none when none is), which joins the output."""
        item = self._open
        if item is None:
            return []
        index = len(self._output)
        if item["type"] == "function_call":
            item = call_item(item["id"], item["call_id"], item["name"], item["arguments"])
            events = [self._event("response.function_call_arguments.done", arguments=item["arguments"],
                                  item_id=item["id"], name=item["name"], output_index=index)]
        else:
            text, where = self._text(), self._where()
            part = text_part(text, self._logprobs or None)
            item = message_item(item["id"], text, logprobs=self._logprobs or None)
            events = [self._event("response.output_text.done", **where, logprobs=[], text=text),
                      self._event("response.content_part.done", **where, part=part)]
        self._open = None
        self._output.append(item)
        return events + [self._event("response.output_item.done", item=item, output_index=index)]

    def _text(self) -> str:
        return self._open["content"][0]["text"] if self._open and self._open["content"] else ""

    def _where(self) -> dict:
        return {"content_index": 0, "item_id": self._open["id"], "output_index": len(self._output)}

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
