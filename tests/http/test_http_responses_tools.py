"""/v1/responses function tools and tool-call input items, without a server (the server's answers
against /v1/chat/completions' are tests/http/test_http_tools.py's, the objects against vLLM's own
test_http_responses_shapes.py's): the input items render the prompt transformers renders for the
chat turns vLLM 0.32 maps them to; "auto" answers text with the tools in the template; what vLLM
does not serve is refused naming the field."""

from __future__ import annotations

import copy
import json

import pytest
from fastapi.exceptions import RequestValidationError

from nlora_serve.engine.api import RequestOutput
from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.openai import chat_params, chat_prompt
from nlora_serve.serving.http_api.request_models import ChatRequest, ParamError
from nlora_serve.serving.http_api.responses_chat import chat_body_of, chat_params_of
from nlora_serve.serving.http_api.responses_request import ResponsesRequest
from nlora_serve.serving.http_api.responses_shape import ResponseShaper
from nlora_serve.serving.server_config import ServerConfig

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
FLAT = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": PARAMS}
CHAT = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": PARAMS}}
# an output item of ours as the SDK dumps it back into the next request's input
CALL = {"arguments": '{"city": "Paris"}', "call_id": "chatcmpl-tool-1", "name": "get_weather", "type": "function_call",
        "id": "fc_1", "async": None, "caller": None, "namespace": None, "status": "completed"}
TEMPLATE = ("{% for t in tools or [] %}[tool {{ t.function.name }}: {{ t.function.parameters | tojson }}]"
            "{% endfor %}{% for m in messages %}<{{ m.role }}{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}>"
            "{{ m.content }}{% for c in m.tool_calls or [] %}(call {{ c.id }} {{ c.function.name }} "
            "{{ c.function.arguments.city }}){% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _request(**fields) -> ResponsesRequest:
    return validated(ResponsesRequest, {"model": "m", "input": "What is the weather in Paris?", **fields})


def test_tool_items_render_as_the_chat_turns_vllm_maps_them_to(tokenizer):
    """A function_call joins the assistant's text before it (vLLM's construct_chat_messages_with_tool_call),
    a function_call_output is a tool message; the prompt is transformers' for those chat turns."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    said = {"role": "assistant", "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]}
    request = _request(tools=[FLAT], tool_choice="none", input=[
        {"role": "user", "content": "Weather?"}, said, CALL,
        {"type": "function_call_output", "call_id": "chatcmpl-tool-1", "output": "18 degrees"}])
    call = {"id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}  # parsed, as vLLM hands it over
    turns = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "18 degrees"}]
    expected = tok.apply_chat_template(turns, tools=[CHAT], add_generation_prompt=True, tokenize=False)
    assert "(call chatcmpl-tool-1 get_weather Paris)" in expected and "<tool chatcmpl-tool-1>18 degrees" in expected
    assert chat_prompt(validated(ChatRequest, chat_body_of(request)), tok) == tok.encode(expected,
                                                                                         add_special_tokens=False)


def _outs(texts: list[str]) -> list[RequestOutput]:
    return [RequestOutput("r", text, [100 + i], "stop" if i == len(texts) - 1 else None, 5, i + 1)
            for i, text in enumerate(texts)]


def _shaper(request: ResponsesRequest) -> ResponseShaper:
    body = validated(ChatRequest, chat_body_of(request))
    params = chat_params_of(chat_params, body, request, ServerConfig())
    return ResponseShaper("resp_1", request, params, 100, None, body.tool_calls()[0])


def test_auto_with_tools_answers_text_with_the_tools_in_the_template():
    """vLLM 0.32's Responses route takes "auto" (its default) and, without --enable-auto-tool-choice,
    parses no calls: the tools reach the template, the answer is a message; echoed as sent."""
    body = chat_body_of(_request(tools=[FLAT]))
    assert body["tools"] == [CHAT] and body["tool_choice"] == "none"
    whole = _shaper(_request(tools=[FLAT])).whole(_outs(["Sunny"]))
    assert whole["tool_choice"] == "auto" and whole["output"][0]["type"] == "message"
    assert whole["tools"] == [{**FLAT, "strict": None, "allowed_callers": None, "async": None, "defer_loading": None,
                               "output_schema": None}]
    assert _shaper(_request()).whole(_outs(["x"]))["tool_choice"] == "none"


@pytest.mark.parametrize("fields, message, param", [
    ({"tool_choice": "required"}, "Tool choice 'required' must be specified with 'tools' parameter.", "tool_choice"),
    ({"tools": [FLAT], "tool_choice": {"type": "function", "name": "nope"}},
     "Tool choice 'function' not found in 'tools' parameter.", "tool_choice"),
    ({"tools": [FLAT], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
     "tool_choice {'type': 'allowed_tools'", "tool_choice"),
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0] is a 'web_search_preview' tool", "tools"),
    # was chat's refusal, whose "correct usage" is chat's {"type": "function", "function": {"name": ...}}
    ({"tools": [{**FLAT, "name": ""}], "tool_choice": {"type": "function", "name": ""}},
     "tool_choice.name is empty", "tool_choice"),
    ({"tools": [{**FLAT, "parameters": "x"}]}, "tools[0].parameters: Input should be a valid dictionary", "tools"),
    ({"tools": [FLAT], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
     "text.format cannot be used with tool_choice 'required'", "text.format"),
    ({"input": [{**CALL, "arguments": "{city"}]}, "input[0].arguments is not JSON: '{city'", "input"),
    # Python's parser takes NaN / Infinity; the tools are echoed: a 500 after generating (whole), NaN in events
    ({"tools": [FLAT, {**FLAT, "parameters": {"x": {"maximum": float("inf")}}}]},
     "tools[1].parameters holds NaN or Infinity", "tools"),
    # nested past Python's parser: was a RecursionError, a 500 with its trace in the log
    ({"input": [{**CALL, "arguments": "[" * 100_000 + "]" * 100_000}]}, "input[0].arguments is nested too deeply",
     "input"),
])
def test_what_vllm_does_not_serve_is_refused_naming_the_field(fields, message, param):
    with pytest.raises(ParamError) as err:
        chat_body_of(_request(**fields))
    assert str(err.value).startswith(message) and err.value.param == param


def test_tool_call_arguments_nested_too_deeply_to_render_are_refused_naming_the_field(tokenizer):
    """Arguments that parse but nest past what the template's renderer recurses through (transformers
    walks every message value recursively) are a 400 naming the messages' field, on chat and on
    /v1/responses (were a RecursionError: a 500 and its trace in the log)."""
    deep = '{"a":' * 700 + "1" + "}" * 700
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
    chat = validated(ChatRequest, {"model": "m", "messages": [{"role": "assistant", "tool_calls": [call]}]})
    responses = validated(ChatRequest, chat_body_of(_request(input=[{**CALL, "arguments": deep}])))
    call["function"]["arguments"] = "[" * 100_000 + "]" * 100_000  # past the parser itself
    past = validated(ChatRequest, {"model": "m", "messages": [{"role": "assistant", "tool_calls": [call]}]})
    for body, field in ((chat, "messages"), (responses, "input"), (past, "messages")):
        with pytest.raises(ParamError) as err:
            chat_prompt(body, tokenizer, field=field)
        assert "nested too deeply" in str(err.value) and err.value.param == field


def test_a_function_call_output_that_is_not_text_is_refused_naming_it():
    with pytest.raises(RequestValidationError) as err:
        _request(input=[CALL, {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}])
    assert err.value.errors()[0]["msg"].startswith("input[1].output: Input should be a valid string")


def test_tools_are_validated_once_per_request(monkeypatch):
    """A request's tools are validated once, not again for every response object a stream writes
    (response.created, .in_progress, .completed): 100k tools (an 11 MB body) held the event loop
    ~1.6 s per validation, so every tenant's requests, ~8 s in all for a stream."""
    from nlora_serve.serving.http_api import responses_request

    calls = []
    real = responses_request.function_tools
    monkeypatch.setattr(responses_request, "function_tools", lambda tools: calls.append(1) or real(tools))
    request = _request(tools=[FLAT, {**FLAT, "name": "other"}], tool_choice="required")
    shaper = _shaper(request)
    for _ in range(3):
        assert [tool["name"] for tool in shaper.response("in_progress", [], None)["tools"]] == ["get_weather", "other"]
    assert len(calls) == 1


def test_more_turns_than_the_context_holds_are_refused_before_the_items_are_validated(monkeypatch):
    """Items that each open a chat turn (a non-assistant message, a function_call_output), more of
    them than max_model_len (each turn renders one token at least), are refused as the chat's
    messages are, before each is validated: 200k items held the event loop 3.3 s (chat's 200k
    messages: 1.4 s). function_calls and assistant text may join a turn: not counted."""
    from types import SimpleNamespace

    from nlora_serve.serving.http_api import responses_route

    monkeypatch.setattr(responses_route, "validated", lambda *a: pytest.fail("validated before the bound"))
    ctx = SimpleNamespace(chat_bounds=(10**6, 4), config=ServerConfig())
    turns = [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c", "output": "y"}] * 3
    with pytest.raises(ParamError) as err:
        responses_route._read({"model": "m", "input": turns[:5]}, ctx)
    assert str(err.value).startswith("input holds 5 items that open a turn each") and err.value.param == "input"
    monkeypatch.undo()
    joined = [CALL] * 5 + [{"role": "assistant", "content": "z"}] + turns[:4]  # 4 turns: served
    responses_route._read({"model": "m", "input": joined}, ctx)


def test_more_function_calls_than_the_bytes_bound_holds_are_refused_before_validation(monkeypatch, tokenizer):
    """function_call items open no turn, so the turn count let 100k of them through to be validated
    (the GIL held ~1 s in all); each adds CALL_BYTES at least to the tool calls' JSON that the
    chat's render counts against its bytes bound: more than the bound holds are refused first, in
    the words of the turn bound; the render refuses the same body (the reference)."""
    from types import SimpleNamespace

    from nlora_serve.serving.http_api import responses_route
    from nlora_serve.serving.http_api.responses_request import CALL_BYTES

    bounds = (2000, 4)
    ctx = SimpleNamespace(chat_bounds=bounds, config=ServerConfig())
    shortest = {"type": "function_call", "call_id": "", "name": "", "arguments": "0"}
    body = {"model": "m", "input": [{"role": "user", "content": "x"}] + [shortest] * (bounds[0] // CALL_BYTES + 1)}
    monkeypatch.setattr(responses_route, "validated", lambda *a: pytest.fail("validated before the bound"))
    with pytest.raises(ParamError) as err:
        responses_route._read(body, ctx)
    assert str(err.value).startswith("input holds 28 function_call items: their tool calls render 2,072 bytes")
    assert err.value.param == "input"
    monkeypatch.undo()
    with pytest.raises(ParamError) as err:
        chat_prompt(validated(ChatRequest, chat_body_of(validated(ResponsesRequest, body))), tokenizer, bounds,
                    field="input")
    assert "bytes of tool calls, tools and template variables" in str(err.value)
    responses_route._read({**body, "input": body["input"][:-2]}, ctx)  # 26 calls: left to the render


def test_tool_call_arguments_and_tools_count_toward_the_bytes_bound(tokenizer):
    """The prompt bytes bound (max_prompt_bytes: refused before tokenizing) counts the tool calls'
    and the rendered tools' JSON, not the contents only: 4 MB of arguments under a template that
    renders them took the one tokenizer thread 4.3 s (every tenant's), 4 MB of content 0.0 s."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    big = "abc def " * 200
    bounds = (1000, 100)
    calls = _request(input=[{**CALL, "arguments": json.dumps({"city": big})}])
    tools = _request(tools=[{**FLAT, "parameters": {**PARAMS, "description": big}}], tool_choice="none")
    for request in (calls, tools):
        with pytest.raises(ParamError) as err:
            chat_prompt(validated(ChatRequest, chat_body_of(request)), tok, bounds, field="input")
        assert "bytes of tool calls, tools and template variables" in str(err.value) and err.value.param == "input"
    small = _request(input=[{**CALL, "arguments": json.dumps({"city": "Paris"})}])
    assert chat_prompt(validated(ChatRequest, chat_body_of(small)), tok, bounds, field="input")


def test_tools_a_template_does_not_read_are_not_made_into_its_dicts(monkeypatch, tokenizer):
    """100k tools under a template that renders none (SmolLM2's) were each dumped into a template
    dict on the tokenizer thread, beside the 100k live models: 0.3-0.4 s of full collections with
    every stream stalled. The prompt is the same; a template that reads tools still gets them."""
    from nlora_serve.serving.http_api.tools import Tool

    request = validated(ChatRequest, chat_body_of(_request(tools=[FLAT] * 3, tool_choice="none")))
    reference = chat_prompt(request, tokenizer)
    monkeypatch.setattr(Tool, "template_dict", lambda self: pytest.fail("a template dict the template never reads"))
    assert "tools" not in (tokenizer.chat_template or "")
    assert chat_prompt(request, tokenizer) == reference
    monkeypatch.undo()
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    assert "[tool get_weather: " in tok.decode(chat_prompt(request, tok))
