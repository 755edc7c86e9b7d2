"""OpenAI's Responses API request (``POST /v1/responses``) as vLLM 0.32 serves it for text: its
model and the checks made before it runs (no I/O); responses_chat.py turns it into the chat
request it runs as.

A Responses request is a chat turn: ``instructions`` is a system message put first, ``input`` a
user message (a string) or a list of items: messages (``{"role", "content"}``, content a string or
``input_text`` / ``output_text`` parts, joined by newlines as vLLM joins them), ``function_call``
and ``function_call_output`` items (an assistant message's tool call, a ``tool`` message:
http_api/responses_tools.py); a final assistant message whose ``status`` is ``in_progress`` or
``incomplete`` is continued instead of answered (vLLM's ``should_continue_final_message``). It runs
as the equivalent :class:`~nlora_serve.serving.http_api.request_models.ChatRequest`
(:func:`~nlora_serve.serving.http_api.responses_chat.chat_body_of`), so sampling, structured output, tools, logprobs, admission and the engine
are /v1/chat/completions' own: ``max_output_tokens`` is a limit lowered to the server's and to the
rest of the context, as vLLM lowers it (:func:`~nlora_serve.serving.http_api.responses_chat.chat_params_of`; chat refuses a ``max_tokens`` over
the server's and lowers one over the context), ``text.format`` (text, json_object, json_schema) is ``response_format``, ``reasoning.effort``
the template's ``reasoning_effort``, function ``tools`` / ``tool_choice`` / ``parallel_tool_calls``
chat's (responses_tools.py: "required" and a named function answer ``function_call`` items,
"auto" and "none" text), ``include: ["message.output_text.logprobs"]`` with ``top_logprobs`` chat's
``logprobs`` / ``top_logprobs``, and vLLM's extras (``top_k``, ``min_p``, ``stop``,
``structured_outputs``, ... :data:`FORWARDED`) go through as they are.

vLLM 0.32 without its response store (``VLLM_ENABLE_RESPONSES_API_STORE`` unset, its default):
``store`` is accepted and ignored (nothing is stored), ``previous_response_id`` is a 404 (no stored
response has that id), ``background: true`` a 400 naming ``background``. ``include``'s other values
change nothing for text and are accepted, as are ``top_logprobs`` without the logprobs include,
``prompt_cache_key``, ``service_tier``, ``metadata``, ``user`` (echoed), OpenAI's
``safety_identifier``, ``prompt_cache_retention`` and ``prompt_cache_options`` (:data:`HINTS`), and,
with ``stream``, ``stream_options`` with ``include_obfuscation`` false or null (as chat's). Any
other field is refused, naming it. Tools other than functions (hosted tools, MCP, custom: vLLM runs
them with a tool server or a harmony model only), items other than messages and function calls and
their outputs (reasoning, images, files) and parts other than text are refused with a 400 naming
``tools`` / ``input``.
"""

from __future__ import annotations

import functools
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from nlora_serve.errors import shown
from nlora_serve.serving.http_api.request_models import ParamError, ReasoningEffort
from nlora_serve.serving.http_api.responses_tools import (FunctionCallItem, FunctionCallOutputItem, FunctionTool,
                                                          function_tools)
from nlora_serve.serving.status import ResponseNotFound

# vLLM 0.32 ResponsesRequest fields that are chat request fields under the same name: given to the chat request
FORWARDED = frozenset({"top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
                       "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                       "cache_salt", "chat_template_kwargs", "structured_outputs", "priority", "watermarking"})
# OpenAI fields vLLM 0.32's model lacks (it ignores them) that change nothing here either: an end-user
# id (the successor of ``user``) and prompt-cache retention and options hints (prefix caching here is
# automatic; chat accepts the same, request_models.OPENAI_IGNORED); accepted at any value
HINTS = frozenset({"safety_identifier", "prompt_cache_retention", "prompt_cache_options"})
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_INCLUDE = Literal["code_interpreter_call.outputs", "computer_call_output.output.image_url",
                   "file_search_call.results", "message.input_image.image_url", "message.output_text.logprobs",
                   "reasoning.encrypted_content"]
REASONING_KEYS = ("context", "effort", "generate_summary", "mode", "summary")  # OpenAI's Reasoning, as vLLM echoes it


class InputPart(BaseModel):
    """A content part of an input message: ``input_text`` (or an ``output_text`` fed back)."""

    model_config = ConfigDict(extra="allow", strict=True)  # an output_text's annotations / logprobs: dropped
    type: str
    text: str | None = None


class InputMessage(BaseModel):
    """A message item of ``input`` (an earlier response's output message included)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None  # an output message fed back: its id, status and phase
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value):
        """Raises PydanticCustomError for a content neither a string nor a list (pydantic would
        name the union's first member only: "content.str: Input should be a valid string")."""
        if not isinstance(value, (str, list)):
            raise PydanticCustomError("content", "must be a string or a list of content parts "
                                      "([{'type': 'input_text', 'text': ...}]); got {kind}",
                                      {"kind": _kind(value)})
        return value


class TextFormat(BaseModel):
    """``text.format``: OpenAI's ``{"type": "text" | "json_object" | "json_schema", ...}`` (flat)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None  # json_schema's: its name, schema, description and strict
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # vLLM takes it and changes nothing


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    context: Literal["auto", "current_turn", "all_turns"] | None = None
    effort: ReasoningEffort | None = None  # the chat template's reasoning_effort, as vLLM's build_chat_params
    generate_summary: Literal["auto", "concise", "detailed"] | None = None
    mode: str | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(BaseModel):
    """OpenAI's Responses ``stream_options``: its random padding of stream events (a side-channel
    mitigation) only, none here: false or null only, as chat's."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_obfuscation: bool | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses (the fields vLLM 0.32 reads for text; extras: :data:`FORWARDED`)."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras: checked in chat_body_of
    model: str  # an adapter name, or the base model's served name
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = True
    background: bool | None = False
    previous_response_id: str | None = None
    tools: list | None = None  # function tools (http_api/responses_tools.py)
    tool_choice: str | dict | None = "auto"  # null: "auto"
    parallel_tool_calls: bool | None = True
    max_tool_calls: int | None = None
    reasoning: Reasoning | None = None
    include: list[_INCLUDE] | None = None
    top_logprobs: int | None = 0
    truncation: Literal["auto", "disabled"] | None = "disabled"
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] = "auto"
    prompt_cache_key: str | None = None  # vLLM: "not implemented yet", ignored
    request_id: str | None = None  # vLLM's: the response id (default "resp_<uuid>")
    enable_response_messages: bool | None = False  # vLLM's: raw prompt/output token messages; false only

    @functools.cached_property
    def function_tools(self) -> list[FunctionTool]:
        """``tools`` validated, once per request (:func:`chat_body_of` and every response object's
        echo read them; raises ParamError as responses_tools.function_tools)."""
        return function_tools(self.tools)

    @property
    def logprobs_included(self) -> bool:
        """``include`` asks for the output text's logprobs (vLLM's ``is_include_output_logprobs``)."""
        return bool(self.include) and LOGPROBS_INCLUDE in self.include

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value):
        """The items of a list ``input`` validated here, each by its ``type``, so that a refusal
        names the item's field (pydantic's union would name its first member: "input.str: Input
        should be a valid string").

        Raises:
            PydanticCustomError: an input neither a string nor a list, an item that is not a message,
                ``function_call`` or ``function_call_output`` (reasoning, images, ...), an item that
                does not validate (its first error, located).
        """
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("input", "must be a string or a list of message items; got {kind}",
                                      {"kind": _kind(value)})
        items = []
        for i, item in enumerate(value):
            kind = item.get("type", "message") if isinstance(item, dict) else None
            model = _ITEMS.get(kind) if isinstance(kind, str) else None
            if model is None:
                what = f"a {shown(kind)!r} item" if isinstance(kind, str) else "not a message object"
                raise PydanticCustomError("input", f"input[{i}] is {what}: this server takes message, function_call "
                                          "and function_call_output items only")
            try:
                items.append(model.model_validate(item))
            except ValidationError as exc:
                raise PydanticCustomError("input", "input[{i}]{where}: {message}",
                                          {"i": i, **_located(exc)}) from None
        return items


_ITEMS = {"message": InputMessage, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}
_JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "an array", dict: "an object"}


def _kind(value) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _located(exc: ValidationError) -> dict[str, str]:
    """``where`` and ``message`` of an item's most specific error: its location as
    ``.content[1].text`` (the union members' tags left out), its message."""
    # the deepest error: in the union member that matched its shape
    first = max(exc.errors(include_url=False), key=lambda error: len(error["loc"]))
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
                    if isinstance(part, int) or (part != "str" and "[" not in part))
    return {"where": where, "message": first["msg"]}


# the fewest bytes one function_call item adds to the tool calls' JSON a chat's render counts against
# its bound (chat_template.render_chat): empty call id and name, the shortest JSON arguments
CALL_BYTES = len(json.dumps({"id": "", "type": "function", "function": {"name": "", "arguments": "0"}}))


def check_turns(data, max_turns: int | None, max_bytes: int | None = None) -> None:
    """Refuse a body whose ``input`` no chat of this server can render, counted on the raw items
    before they are validated one by one (200k items held the event loop 3.3 s, 100k function
    calls ~1 s): more items that open a chat turn each than the context holds tokens (each renders
    one at least: chat's ``max_messages`` bound; a non-assistant message and a
    ``function_call_output`` open a turn, a ``function_call`` and an assistant message may join
    the turn before them), or more ``function_call`` items than ``max_bytes`` holds of their tool
    calls' JSON (each :data:`CALL_BYTES` at least: chat's bound on content and tool calls). Anything
    malformed is left to validation.

    Raises:
        ParamError: param ``input``.
    """
    items = data.get("input") if isinstance(data, dict) else None
    if not max_turns or not isinstance(items, list) or len(items) <= max_turns:
        return
    kinds = [item.get("type", "message") if isinstance(item, dict) else None for item in items]
    turns = sum(1 for kind, item in zip(kinds, items) if kind == "function_call_output" or kind == "message"
                and item.get("role") != "assistant")
    if turns > max_turns:
        raise ParamError(f"input holds {turns:,} items that open a turn each: more turns than the model's context "
                         f"holds tokens (max_model_len {max_turns}; refused before validating them)", "input")
    calls = kinds.count("function_call")
    if max_bytes is not None and calls * CALL_BYTES > max_bytes:
        raise ParamError(f"input holds {calls:,} function_call items: their tool calls render {calls * CALL_BYTES:,} "
                         "bytes of JSON at least, more tokens than the model's context holds (max_model_len; "
                         f"refused before validating them above {max_bytes:,} bytes)", "input")


def check_stateless(request: ResponsesRequest) -> None:
    """vLLM 0.32's answers without its response store, in its order and words.

    Raises:
        ParamError: ``background`` true (param ``background``). ResponseNotFound:
            ``previous_response_id`` given (no response is stored).
    """
    if request.background:
        if not request.store:
            raise ParamError("background can only be used when `store` is true", "background")
        raise ParamError("This vLLM engine does not support `store=True` and therefore does not support the "
                         "background mode. To enable these features, set the environment variable "
                         "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.", "background")
    if request.previous_response_id is not None:
        raise ResponseNotFound(f"Response with id '{shown(request.previous_response_id)}' not found.")
