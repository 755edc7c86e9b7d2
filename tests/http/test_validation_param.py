"""The field a validation error names (HTTP ``param``) for union-typed fields: the field the client
sent, never pydantic's label of the union's first member ("tool_choice.str", "stop.str")."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest, ParamError
from nlora_serve.serving.http_api.responses_chat import chat_body_of
from nlora_serve.serving.http_api.responses_request import ResponsesRequest

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kind, fields, loc, words", [
    (ChatRequest, {"tool_choice": 5}, ("tool_choice",),
     "Input should be a valid string, got 5 (as str); or as dict[any,any]: Input should be a valid dictionary, got 5"),
    (ChatRequest, {"stop": 5}, ("stop",), "or as list[str]: Input should be a valid list"),
    (ChatRequest, {"stop": ["a", 5]}, ("stop",), "got an array (as str); or as list[str]: at stop.1: Input should be a valid string, got 5"),
    (ChatRequest, {"messages": [{"role": "user", "content": 5}]}, ("messages", 0, "content"), "valid list"),
    (ChatRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     ("messages", 0, "content"), "at messages.0.content.0.text: Input should be a valid string"),
    (CompletionRequest, {"stop": 5}, ("stop",), "valid list"),
    (ResponsesRequest, {"tool_choice": 5}, ("tool_choice",), "valid dictionary"),
    # no union: as they were
    (ChatRequest, {"messages": [{"role": "user", "content": "Hi", "name": 5}]}, ("messages", 0, "name"),
     "Input should be a valid string"),
    (ChatRequest, {"logit_bias": {"1": "x"}}, ("logit_bias", "1"), 'Input should be a valid number, got "x"'),
    (ChatRequest, {"tools": [{"type": "function", "function": {"name": 5}}]}, ("tools", 0, "function", "name"),
     "Input should be a valid string"),
    (ChatRequest, {"tools": [{"type": "function", "function": {}}]}, ("tools", 0, "function", "name"),
     "Field required"),
], ids=["chat_tool_choice", "chat_stop", "chat_stop_item", "content", "content_part", "completion_stop",
        "responses_tool_choice", "name", "logit_bias", "tool_name", "tool_name_missing"])
def test_a_union_fields_error_names_the_field(kind, fields, loc, words):
    body = {"model": "m", **({"input": "hi"} if kind is ResponsesRequest else
                             {"prompt": "hi"} if kind is CompletionRequest else {"messages": HI}), **fields}
    with pytest.raises(RequestValidationError) as err:
        validated(kind, body)
    first = err.value.errors()[0]
    assert first["loc"] == loc and words in first["msg"], first


@pytest.mark.parametrize("value, words", [
    (0, "enable_response_messages: Input should be a valid boolean, got 0"),  # said "=true is not supported"
    ("yes", 'enable_response_messages: Input should be a valid boolean, got "yes"'),
    ({}, "enable_response_messages: Input should be a valid boolean, got an object"),
])
def test_a_responses_boolean_flag_that_is_no_boolean_is_refused_as_the_others(value, words):
    """enable_response_messages took any value but false / null as true and refused it as
    "enable_response_messages=true is not supported"; it is refused as store or stream are."""
    for name in ("enable_response_messages", "store"):
        with pytest.raises(RequestValidationError) as err:
            validated(ResponsesRequest, {"model": "m", "input": "hi", name: value})
        first = err.value.errors()[0]
        assert first["loc"] == (name,) and f"{name}: {first['msg']}" == words.replace("enable_response_messages", name)


def test_enable_response_messages_true_says_what_to_send():
    request = validated(ResponsesRequest, {"model": "m", "input": "hi", "enable_response_messages": True})
    with pytest.raises(ParamError) as err:
        chat_body_of(request)
    assert err.value.param == "enable_response_messages" and "send false or leave it out" in str(err.value)
    for value in (False, None):
        chat_body_of(validated(ResponsesRequest, {"model": "m", "input": "hi", "enable_response_messages": value}))


@pytest.mark.parametrize("chat, body, loc, words", [
    (False, {"model": "m", "messages": HI}, ("prompt",), "Field required; 'messages' is a chat's field: send chats to "
     "POST /v1/chat/completions (this endpoint takes a 'prompt')"),
    (False, {"messages": HI}, ("prompt",), "send chats to POST /v1/chat/completions"),  # before model's error
    (True, {"model": "m", "prompt": "hi"}, ("messages",), "Field required; 'prompt' is a completion's field: send "
     "raw-text prompts to POST /v1/completions (this endpoint takes 'messages')"),
    (False, {"model": "m"}, ("prompt",), "Field required"),  # nothing sent for the other endpoint: as before
])
def test_a_body_for_the_other_openai_endpoint_says_where_it_goes(chat, body, loc, words):
    """h130: a chat body sent to /v1/completions was told only "prompt: Field required" (param
    prompt, as vLLM's "Either prompt or prompt_embeds must be provided"); now also where it belongs."""
    from nlora_serve.serving.http_api.openai_route import validated_openai

    with pytest.raises(RequestValidationError) as err:
        validated_openai(body, chat)
    first = err.value.errors()[0]
    assert first["loc"] == loc and first["msg"].startswith("Field required") and words in first["msg"], first
    if len(body) == 1 and "model" in body:
        assert first["msg"] == "Field required"


EFFORTS = "'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'"  # vLLM 0.32's Literal, OpenAI's


@pytest.mark.parametrize("kind, fields, loc", [
    (ChatRequest, {"messages": HI, "reasoning_effort": "hgih"}, ("reasoning_effort",)),
    (ResponsesRequest, {"input": "hi", "reasoning": {"effort": "hgih"}}, ("reasoning", "effort")),
], ids=["chat", "responses"])
def test_a_reasoning_effort_vllm_does_not_know_is_refused_naming_it(kind, fields, loc):
    """s30-hostile: any string was taken as reasoning_effort ("hgih", or 5,000 characters) and given
    to the template, which a reasoning model's template compares with "high": the typo changed
    nothing, silently. vLLM's field is a Literal of these values: a 400 naming it."""
    with pytest.raises(RequestValidationError) as err:
        validated(kind, {"model": "m", **fields})
    first = err.value.errors()[0]
    assert first["loc"] == loc and first["msg"] == f'Input should be {EFFORTS}, got "hgih"', first
    for effort in ("none", "high", "max", None):
        good = {"reasoning_effort": effort} if kind is ChatRequest else {"reasoning": {"effort": effort}}
        validated(kind, {"model": "m", **{**fields, **good}})


@pytest.mark.parametrize("kind, fields, message, param", [
    (CompletionRequest, {"prompt": ["a", ""]}, "prompt[1] is empty: every prompt of a batch needs at least one token",
     "prompt"),
    (CompletionRequest, {"prompt": True}, "prompt is a boolean: send a text, token ids, or a list of texts or of "
     "token-id lists", "prompt"),
    (ResponsesRequest, {"input": [{"content": "x"}]}, "input[0].role: Field required", "input"),
    (CompletionRequest, {"prompt": "a", "prompt_logprobs": "x"}, 'prompt_logprobs: Input should be a valid integer, got "x"',
     "prompt_logprobs"),  # no message naming it: prefixed
    (ChatRequest, {"messages": HI, "n": "x"}, 'n: Input should be a valid integer, got "x"', "n"),
], ids=["prompt_item", "prompt", "input_item", "other_field", "pydantic"])
def test_the_400_names_the_field_once(kind, fields, message, param):
    """The HTTP 400 put its field before each validation message: "prompt: prompt[0] is empty: ...",
    "input: input[0].role: ..."; a message that names its field first is sent as it is."""
    import asyncio
    import json

    from starlette.requests import Request

    from nlora_serve.serving.http_api.routes import _invalid

    with pytest.raises(RequestValidationError) as err:
        validated(kind, {"model": "m", **({"input": "hi"} if kind is ResponsesRequest else {}), **fields})
    request = Request({"type": "http", "method": "POST", "path": "/tokenize", "headers": []})  # not counted: no ctx
    answer = json.loads(asyncio.run(_invalid(request, err.value)).body)["error"]
    assert (answer["message"], answer["param"]) == (message, param)


BIG = "x" * 5000
TOOL = [{"type": "function", "function": {"name": "f"}}]
DEFS = [{"type": "function", "function": {"name": name, "parameters": {"$defs": {BIG: {"type": kind}}}}}
        for name, kind in (("f", "string"), ("g", "integer"))]


@pytest.mark.parametrize("kind, fields, tail", [
    (ChatRequest, {BIG: 1}, "remove it"),
    (ChatRequest, {"tool_choice": BIG, "tools": TOOL}, 'Only named tools, "none", "auto" or "required" are supported.'),
    (ChatRequest, {"tool_choice": {"type": "function", "function": BIG}, "tools": TOOL}, "my_function\"}}`"),
    (ChatRequest, {"tool_choice": {"type": "function", "function": {"name": [BIG]}}, "tools": TOOL}, "}}`"),
    (ChatRequest, {"tool_choice": "required", "tools": DEFS}, "has multiple schemas, which is not supported."),
    (ResponsesRequest, {"tool_choice": BIG}, "or {'type': 'function', 'name': ...}"),
    (ResponsesRequest, {"previous_response_id": BIG}, "not found."),
], ids=["unsupported_field", "tool_choice", "tool_choice_function", "tool_choice_name", "defs_name",
        "responses_tool_choice", "previous_response_id"])
def test_a_refusal_quotes_a_long_value_cut_and_keeps_its_words(kind, fields, tail):
    """A refusal echoed the client's value whole: a 5,000-character key or string made a 5,000-character
    message, which the error body then cut at 1,000, losing what it said after the value. Cut to 200."""
    from nlora_serve.errors import NloraError
    from nlora_serve.serving.http_api.openai import chat_params
    from nlora_serve.serving.http_api.responses_request import check_stateless
    from nlora_serve.serving.server_config import ServerConfig

    body = validated(kind, {"model": "m", **({"input": "hi"} if kind is ResponsesRequest else {"messages": HI}),
                            **fields})
    with pytest.raises((NloraError, ParamError)) as err:
        check_stateless(body) or chat_body_of(body) if kind is ResponsesRequest else chat_params(body, ServerConfig())
    message = str(err.value)
    assert message.endswith(tail) and "x" * 198 + "..." in message and "x" * 201 not in message, message[:300]


@pytest.mark.parametrize("fields, words", [
    ({"input": [{"type": BIG}]}, "input[0] is a '{}' item: this server takes message, function_call and "
     "function_call_output items only"),
    ({"tools": [{"type": BIG}]}, "tools[0] is a '{}' tool: this server serves function tools only"),
], ids=["input_item", "tool"])
def test_a_responses_item_or_tool_type_is_quoted_cut(fields, words):
    from nlora_serve.errors import NloraError

    try:
        chat_body_of(validated(ResponsesRequest, {"model": "m", "input": "hi", **fields}))
        raise AssertionError("accepted")
    except RequestValidationError as exc:
        message = exc.errors()[0]["msg"]
    except (NloraError, ParamError) as exc:
        message = str(exc)
    assert message.startswith(words.format("x" * 200 + "...")), message[:300]


def test_a_content_type_is_quoted_cut():
    from nlora_serve.serving.http_api.body import parsed_json

    with pytest.raises(RequestValidationError) as err:
        parsed_json(b"{}", "text/" + BIG)
    message = err.value.errors()[0]["msg"]
    assert message == f"Content-Type {'text/' + 'x' * 75 + '...'!r} is not JSON; send the JSON body with " \
                      "'Content-Type: application/json'"


@pytest.mark.parametrize("fields, where, words", [
    ({"logit_bias": {BIG: "x"}}, "logit_bias.", 'Input should be a valid number, got "x"'),
    ({"messages": [{"role": "user", "content": "hi", BIG: 1}]}, "messages.0.", "Extra inputs are not permitted"),
    ({"response_format": {"type": "json_object", BIG: 1}}, "response_format.", "Extra inputs are not permitted"),
    ({"structured_outputs": {BIG: 1}}, "structured_outputs.", "Extra inputs are not permitted"),
], ids=["logit_bias_key", "message_field", "response_format_field", "structured_outputs_field"])
def test_a_long_key_in_the_fields_path_is_cut(fields, where, words):
    """The path a validation message opens with holds the client's keys: a 5,000-character unknown
    key made the 400 all key, cut at 1,000 with pydantic's words lost. The path is cut at 200."""
    import asyncio
    import json

    from starlette.requests import Request

    from nlora_serve.serving.http_api.openai import chat_params
    from nlora_serve.serving.http_api.routes import _invalid
    from nlora_serve.serving.server_config import ServerConfig

    try:
        chat_params(validated(ChatRequest, {"model": "m", "messages": HI, **fields}), ServerConfig())
        raise AssertionError("accepted")
    except RequestValidationError as exc:
        request = Request({"type": "http", "method": "POST", "path": "/tokenize", "headers": []})
        message = json.loads(asyncio.run(_invalid(request, exc)).body)["error"]["message"]
    except ParamError as exc:
        message = str(exc)
    assert message == f"{(where + BIG)[:200]}...: {words}"
