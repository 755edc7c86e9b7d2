"""OpenAI's Responses API request (``POST /v1/responses``) as vLLM 0.32 serves it for text, and
its translation to the chat request it runs as (no I/O).

A Responses request is a chat turn: ``instructions`` is a system message put first, ``input`` a
user message (a string) or a list of items: messages (``{"role", "content"}``, content a string or
``input_text`` / ``output_text`` parts, joined by newlines as vLLM joins them), ``function_call``
and ``function_call_output`` items (an assistant message's tool call, a ``tool`` message:
http_api/responses_tools.py); a final assistant message whose ``status`` is ``in_progress`` or
``incomplete`` is continued instead of answered (vLLM's ``should_continue_final_message``). It runs
as the equivalent :class:`~nlora_serve.serving.http_api.request_models.ChatRequest`
(:func:`chat_body_of`), so sampling, structured output, tools, logprobs, admission and the engine
are /v1/chat/completions' own: ``max_output_tokens`` is a limit lowered to the server's and to the
rest of the context, as vLLM lowers it (:func:`chat_params_of`; chat refuses a ``max_tokens`` over
them), ``text.format`` (text, json_object, json_schema) is ``response_format``, ``reasoning.effort``
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

import dataclasses
import functools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from nlora_serve.engine.sampling import RequestError, SamplingParams
from nlora_serve.serving.http_api.request_models import IGNORED, ChatRequest, ParamError, unsupported
from nlora_serve.serving.http_api.responses_tools import (FunctionCallItem, FunctionCallOutputItem, FunctionTool,
                                                          add_assistant_text, add_item, chat_tool_choice,
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
    effort: str | None = None  # the chat template's reasoning_effort, as vLLM's build_chat_params
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
                what = f"a {kind!r} item" if isinstance(kind, str) else "not a message object"
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


def check_turns(data, max_turns: int | None) -> None:
    """Refuse a body whose ``input`` opens more chat turns than the context holds tokens (each
    renders one at least: chat's ``max_messages`` bound), counted on the raw items before they are
    validated one by one (200k items held the event loop 3.3 s): a non-assistant message and a
    ``function_call_output`` open a turn each; a ``function_call`` and an assistant message may join
    the turn before them, and are not counted. Anything malformed is left to validation.

    Raises:
        ParamError: more such items than ``max_turns`` (param ``input``).
    """
    items = data.get("input") if isinstance(data, dict) else None
    if not max_turns or not isinstance(items, list) or len(items) <= max_turns:
        return
    turns = sum(1 for item in items if isinstance(item, dict) and (
        item.get("type") == "function_call_output" or item.get("type", "message") == "message"
        and item.get("role") != "assistant"))
    if turns > max_turns:
        raise ParamError(f"input holds {turns:,} items that open a turn each: more turns than the model's context "
                         f"holds tokens (max_model_len {max_turns}; refused before validating them)", "input")


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
        raise ResponseNotFound(f"Response with id '{request.previous_response_id}' not found.")


def chat_body_of(request: ResponsesRequest, auto: bool = False) -> dict:
    """The chat request body ``request`` runs as (validated as a ChatRequest by the caller);
    ``auto``: the server parses tool_choice "auto"'s calls (--enable-auto-tool-choice), else "auto"
    runs as "none".

    Raises:
        ParamError: a field this server does not implement (an unknown one, ``prompt``,
            ``truncation: "auto"``, text.format json_schema without its schema or with
            structured_outputs), a tool or tool_choice responses_tools.py refuses, a part that is
            not text, an input without messages.
    """
    _check_unsupported(request)
    tools = request.function_tools
    _, tool_choice = chat_tool_choice(request.tool_choice, tools, auto)
    extras = request.model_extra or {}
    messages = ([{"role": "system", "content": request.instructions}] if request.instructions else [])
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for i, item in enumerate(request.input):
            if not isinstance(item, InputMessage):
                add_item(messages, item, i)
            elif item.role == "assistant":
                add_assistant_text(messages, _text(item, i))
            else:
                messages.append({"role": item.role, "content": _text(item, i)})
    if not messages:
        raise ParamError("input holds no message", "input")
    response_format = _response_format(request)
    if response_format is not None and response_format["type"] != "text" and tool_choice not in ("none", "auto"):
        # chat's refusal, naming the Responses field (vLLM's tool parser drops the format unsaid)
        raise ParamError("text.format cannot be used with tool_choice 'required' or a named function: the output "
                         "is forced to the tool calls' JSON", "text.format")
    last = request.input[-1] if isinstance(request.input, list) and request.input else None
    continued = (isinstance(last, InputMessage) and last.role == "assistant"
                 and last.status in ("in_progress", "incomplete"))
    body = {"model": request.model, "messages": messages, "stream": bool(request.stream),
            "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed, "user": request.user,
            "response_format": response_format,
            "reasoning_effort": request.reasoning.effort if request.reasoning is not None else None,
            "tools": [tool.chat_tool() for tool in tools] or None, "tool_choice": tool_choice,
            "parallel_tool_calls": request.parallel_tool_calls,
            **{name: value for name, value in extras.items() if name in FORWARDED or name in IGNORED}}
    if request.logprobs_included:  # vLLM's: top_logprobs counts only with the include
        body.update(logprobs=True, top_logprobs=request.top_logprobs or 0)
    if continued:
        body.update(add_generation_prompt=False, continue_final_message=True)
    return body


def tools_echo(request: ResponsesRequest) -> tuple[str | dict, list[dict]]:
    """(``tool_choice``, ``tools``) as vLLM 0.32's response echoes them (checked by :func:`chat_body_of`)."""
    tools = request.function_tools
    return chat_tool_choice(request.tool_choice, tools)[0], [tool.echo() for tool in tools]


def chat_params_of(run, body: ChatRequest, request: ResponsesRequest, config) -> SamplingParams:
    """``run(body, config)`` (openai.chat_params: the engine params of ``request``'s chat ``body``)
    with ``max_output_tokens`` as vLLM 0.32 takes it: a limit lowered to the server's (``--max-tokens``,
    the generation config's cap) and, as the body sets no max_tokens, to the rest of the context
    (:func:`~nlora_serve.serving.stream.start_request`), never refused for being over them
    (vLLM's ``min(max_output_tokens, default_max_tokens)``); a structured-output spec that does not
    compile, or that chat refuses before compiling (nested too deeply, too long), is blamed on
    ``text.format``, the field the request has (chat's words name ``response_format``).

    Raises:
        RequestError: from ``run``; a ``response_format`` refusal as a ParamError naming ``text.format``.
    """
    try:
        params = run(body, config)
    except RequestError as exc:
        if exc.param != "response_format":
            raise
        message = str(exc).replace("response_format.json", "text.format.schema", 1).replace(
            "response_format", "text.format")
        raise ParamError(message, "text.format") from None
    if request.max_output_tokens is not None:
        params = dataclasses.replace(params, max_tokens=min(params.max_tokens, request.max_output_tokens))
    structured = params.structured_outputs
    if structured is not None and structured.param == "response_format":
        params = dataclasses.replace(params, structured_outputs=dataclasses.replace(structured, param="text.format"))
    return params


def _check_unsupported(request: ResponsesRequest) -> None:
    for name, value in (request.model_extra or {}).items():
        if name == "prompt" and value is not None:
            raise ParamError("prompt template is not supported", "prompt")  # vLLM's words
        if name not in FORWARDED | IGNORED | HINTS and name != "prompt":
            raise unsupported(name)
    if request.enable_response_messages:  # a boolean, as the model's other flags (0 or "yes" is a 400 there)
        raise ParamError("enable_response_messages=true is not supported: this server returns no raw input / "
                         "output messages; send false or leave it out", "enable_response_messages")
    if request.stream_options is not None and not request.stream:  # as chat refuses it
        raise ParamError("stream_options is only allowed with stream=true", "stream_options")
    if request.stream_options is not None and request.stream_options.include_obfuscation:
        raise ParamError("stream_options.include_obfuscation=true is not supported: this server pads no event with "
                         "an obfuscation field; send false or leave it out", "stream_options.include_obfuscation")
    if request.truncation == "auto":
        raise ParamError("truncation 'auto' is not supported by this server; send 'disabled'", "truncation")
    if request.max_output_tokens is not None and request.max_output_tokens < 1:
        raise ParamError(f"max_output_tokens must be >= 1; got {request.max_output_tokens}", "max_output_tokens")


def _text(item: InputMessage, index: int) -> str:
    """A message item's text: its string, or its text parts joined by newlines.

    Raises:
        ParamError: a part that is not ``input_text`` / ``output_text`` (images, files, audio).
    """
    if isinstance(item.content, str):
        return item.content
    for j, part in enumerate(item.content):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise ParamError(f"input[{index}].content[{j}] is a {part.type!r} part: this server reads text parts "
                             "only ({'type': 'input_text', 'text': ...})", "input")
    return "\n".join(part.text for part in item.content)


def _response_format(request: ResponsesRequest) -> dict | None:
    """``text.format`` as chat's ``response_format`` (None: free text).

    Raises:
        ParamError: json_schema without ``schema`` or ``name``; text or json_object with one of
            json_schema's fields; text.format with structured_outputs.
    """
    fmt = request.text.format if request.text is not None else None
    if fmt is None:
        return None
    if (request.model_extra or {}).get("structured_outputs") is not None:  # vLLM's words
        raise ParamError("Cannot specify both structured_outputs and text.format", "structured_outputs")
    if fmt.type != "json_schema":
        given = [key for key, value in (("name", fmt.name), ("schema", fmt.schema_), ("description", fmt.description),
                                        ("strict", fmt.strict)) if value is not None]
        if given:  # a schema sent with json_object would be ignored: the answer would not follow it
            raise ParamError(f"text.format of type {fmt.type!r} takes no {given[0]!r} (name, schema, description "
                             "and strict are type 'json_schema''s fields)", "text.format")
        return {"type": fmt.type}
    if fmt.schema_ is None or fmt.name is None:
        raise ParamError("text.format of type 'json_schema' needs 'name' and 'schema'", "text.format")
    return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_,
                                                   "description": fmt.description, "strict": fmt.strict}}
