"""/v1/responses function tools, tool-call input items and logprobs, without a server (the server's
answers against /v1/chat/completions' are tests/http/test_http_tools.py's): the input items render the
prompt transformers renders for the chat turns vLLM 0.32 maps them to; the ResponseShaper's calls,
whole and streamed, and its logprobs parse as the openai SDK's types, with vLLM's item keys; and
what vLLM does not serve is refused naming the field."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
from fastapi.exceptions import RequestValidationError
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from nlora_serve.engine.api import RequestOutput
from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.openai import chat_params, chat_prompt
from nlora_serve.serving.http_api.request_models import ChatRequest, ParamError
from nlora_serve.serving.http_api.responses import Shaper
from nlora_serve.serving.http_api.responses_request import ResponsesRequest, chat_body_of, chat_params_of
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


def _outs(texts: list[str], logprobs: bool = False) -> list[RequestOutput]:
    return [RequestOutput("r", text, [100 + i], "stop" if i == len(texts) - 1 else None, 5, i + 1,
                          logprobs=[{100 + i: -0.5, 7: -1.5}] if logprobs else None) for i, text in enumerate(texts)]


def _shaper(request: ResponsesRequest, tokenizer=None) -> ResponseShaper:
    body = validated(ChatRequest, chat_body_of(request))
    params = chat_params_of(chat_params, body, request, ServerConfig())
    chat = Shaper("resp_1", "m", True, tokenizer, body.top_logprobs) if body.logprobs else None
    return ResponseShaper("resp_1", request, params, 100, chat, body.tool_calls()[0])


def _events(shaper: ResponseShaper, outs: list[RequestOutput]) -> list[dict]:
    async def run():
        async def rest():
            for out in outs[1:]:
                yield out
        return [event async for event in shaper.events(outs[0], rest())]
    events = [json.loads(e.split("\ndata: ", 1)[1]) for e in asyncio.run(run())]
    for event in events:  # the SDK's types parse every one
        TypeAdapter(ResponseStreamEvent).validate_python(event)
    return events


@pytest.mark.parametrize("choice, texts, calls", [
    ({"type": "function", "name": "get_weather"}, ['{"city"', ': "Paris"', "", "}"],
     [("get_weather", '{"city": "Paris"}')]),
    ("required", ['[{"name": "get_weather", ', '"parameters": {"city": "Paris"', "}}, ",
                  '{"name": "get_weather", "parameters": {"city": "Rome"}}', "]"],
     [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')]),
], ids=["named", "required"])
def test_calls_whole_and_streamed_are_function_call_items(choice, texts, calls):
    """Whole: one function_call item per call (vLLM's build_response_output_items, no message);
    streamed: each call's output_item.added (arguments ""), its argument deltas, arguments.done
    and output_item.done, in output order, joining to the whole's items; the SDK parses both."""
    request = _request(tools=[FLAT], tool_choice=choice)
    whole = _shaper(request).whole(_outs(texts))
    assert [(i["name"], json.loads(i["arguments"])) for i in whole["output"]] == [(n, json.loads(a))
                                                                                  for n, a in calls]
    assert {tuple(i) for i in whole["output"]} == {("arguments", "call_id", "name", "type", "id", "async", "caller",
                                                    "namespace", "status")}
    assert all(i["id"].startswith("fc_") and i["call_id"].startswith("chatcmpl-tool-") for i in whole["output"])
    parsed = Response.model_validate(whole)
    assert parsed.tool_choice == (choice if isinstance(choice, str) else parsed.tool_choice)
    assert parsed.tools[0].name == "get_weather" and parsed.tools[0].parameters == PARAMS

    events = _events(_shaper(request), _outs(texts))
    kinds = [e["type"].removeprefix("response.") for e in events]
    runs = [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]]  # repeats as one
    assert runs == ["created", "in_progress", *["output_item.added", "function_call_arguments.delta",
                                                "function_call_arguments.done", "output_item.done"] * len(calls),
                    "completed"]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [(i["name"], json.loads(i["arguments"])) for i in done] == [(n, json.loads(a)) for n, a in calls]
    for index, item in enumerate(done):
        added = next(e for e in events if e["type"] == "response.output_item.added" and e["output_index"] == index)
        assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
        assert added["item"]["id"] == item["id"] and added["item"]["call_id"] == item["call_id"]
        deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                  and e["item_id"] == item["id"]]
        assert "".join(deltas) == item["arguments"]
        (finished,) = [e for e in events if e["type"] == "response.function_call_arguments.done"
                       and e["output_index"] == index]
        assert finished["arguments"] == item["arguments"] and finished["name"] == "get_weather"
    assert events[-1]["response"]["output"] == done
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_logprobs_are_chats_entries_whole_and_streamed(tokenizer):
    """include message.output_text.logprobs: the output_text part's logprobs are chat's logprobs
    content for the same deltas; a stream's text deltas carry them without bytes (vLLM's
    _to_stream_logprobs) and its content_part.done the whole's; top_logprobs is echoed."""
    request = _request(include=["message.output_text.logprobs"], top_logprobs=1)
    texts = ["Hi", " there"]
    whole = _shaper(request, tokenizer).whole(_outs(texts, logprobs=True))
    chat = Shaper("c", "m", True, tokenizer, 1).whole(_outs(texts, logprobs=True))["choices"][0]["logprobs"]["content"]
    assert whole["output"][0]["content"][0]["logprobs"] == chat and len(chat) == 2
    assert whole["top_logprobs"] == 1 and Response.model_validate(whole).output_text == "Hi there"
    events = _events(_shaper(request, tokenizer), _outs(texts, logprobs=True))
    streamed = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert streamed == [{"token": e["token"], "logprob": e["logprob"], "top_logprobs": [
        {"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]} for e in chat]
    (part,) = [e["part"] for e in events if e["type"] == "response.content_part.done"]
    assert part["logprobs"] == chat and events[-1]["response"]["output"][0]["content"] == [part]
    assert _shaper(_request(), tokenizer).whole(_outs(texts))["output"][0]["content"][0]["logprobs"] is None


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
    ({"tools": [{**FLAT, "parameters": "x"}]}, "tools[0].parameters: Input should be a valid dictionary", "tools"),
])
def test_what_vllm_does_not_serve_is_refused_naming_the_field(fields, message, param):
    with pytest.raises(ParamError) as err:
        chat_body_of(_request(**fields))
    assert str(err.value).startswith(message) and err.value.param == param


def test_a_function_call_output_that_is_not_text_is_refused_naming_it():
    with pytest.raises(RequestValidationError) as err:
        _request(input=[CALL, {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}])
    assert err.value.errors()[0]["msg"].startswith("input[1].output: Input should be a valid string")
