"""A Responses API request (responses_request.py, which says what each field means) as the chat
request it runs as: the /v1/chat/completions body (:func:`chat_body_of`), then chat's engine
parameters with ``max_output_tokens`` and ``text.format`` as vLLM 0.32 takes them
(:func:`chat_params_of`), and the tools as a response echoes them (:func:`tools_echo`). No I/O.
"""

from __future__ import annotations

import dataclasses

from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.errors import shown
from nlora_serve.serving.http_api.request_models import IGNORED, ChatRequest, ParamError, unsupported
from nlora_serve.serving.http_api.responses_request import FORWARDED, HINTS, InputMessage, ResponsesRequest
from nlora_serve.serving.http_api.responses_tools import add_assistant_text, add_item, chat_tool_choice


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
        ParamError: a part that is not ``input_text`` / ``output_text`` (images, files, audio), or
            one without its text string; each names the part.
    """
    if isinstance(item.content, str):
        return item.content
    for j, part in enumerate(item.content):
        if part.type not in ("input_text", "output_text"):
            raise ParamError(f"input[{index}].content[{j}] is a {shown(part.type)!r} part: this server reads text "
                             "parts only ({'type': 'input_text', 'text': ...})", "input")
        if part.text is None:
            raise ParamError(f"input[{index}].content[{j}].text is missing or null: the part carries "
                             "its text as a string", "input")
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
                             "and strict are fields of type 'json_schema')", "text.format")
        return {"type": fmt.type}
    if fmt.schema_ is None or fmt.name is None:
        raise ParamError("text.format of type 'json_schema' needs 'name' and 'schema'", "text.format")
    return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_,
                                                   "description": fmt.description, "strict": fmt.strict}}
