"""/v1/responses objects with vLLM 0.32's keys and values, event by event and whole (text, and
function_call items of "required" and named tool choices): our
ResponseShaper on hand-made engine outputs against vLLM's own OpenAIServingResponses' answers to
the same outputs, recorded by tests/http/vllm_responses_shapes.py (run in the vLLM venv) in
tests/data/vllm_responses_shapes.json; and the SDK's own pydantic types parse every one. No server."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.openai import chat_params
from nlora_serve.serving.http_api.request_models import ChatRequest, ParamError
from nlora_serve.serving.http_api.responses import Shaper
from nlora_serve.serving.http_api.responses_chat import chat_body_of, chat_params_of
from nlora_serve.serving.http_api.responses_request import ResponsesRequest
from nlora_serve.serving.http_api.responses_shape import ResponseShaper
from nlora_serve.serving.server_config import ServerConfig

RECORDED = json.loads((Path(__file__).parents[1] / "data" / "vllm_responses_shapes.json").read_text())
VLLM, VOCAB = RECORDED["cases"], RECORDED["vocab"]
_EVENTS = TypeAdapter(ResponseStreamEvent)  # built once: ~0.1 s a build
_IDS = re.compile(r"\b(resp_|msg_|fc_|chatcmpl-tool-)[0-9a-f]{16,32}\b")


def _normal(value):
    """``value`` with the random ids as ``resp_*`` / ``msg_*`` / ``fc_*`` / ``chatcmpl-tool-*`` (a
    call id: vLLM's 16 hex, chat's 32) and no ``created_at`` (a clock)."""
    text = _IDS.sub(lambda m: f"{m.group(1)}*", json.dumps(value))
    return json.loads(text, object_hook=lambda d: {k: v for k, v in d.items() if k != "created_at"})


class _Vocab:
    """A tokenizer of the recorded cases' few tokens (vllm_responses_shapes.VOCAB, JSON keys)."""

    def __init__(self, vocab: dict[str, str]) -> None:
        self.vocab = {int(i): text for i, text in vocab.items()}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


def _ours(case: dict, vocab: dict[str, str]) -> list | dict:
    request = validated(ResponsesRequest, {"model": "m", "input": "hi", **case["request"]})
    body = validated(ChatRequest, chat_body_of(request))
    params = chat_params_of(chat_params, body, request, ServerConfig())
    chat = Shaper("resp_0123456789abcdef", "m", True, _Vocab(vocab), body.top_logprobs) if body.logprobs else None
    shaper = ResponseShaper("resp_0123456789abcdef", request, params, case["max_tokens"], chat, body.tool_calls()[0])
    prompt, outs, made = len(case.get("prompt_ids", [0] * 4)), [], 0
    for step in case["steps"]:
        made += len(step["token_ids"])
        logprobs = [dict(entries) for entries in step["logprobs"]] if "logprobs" in step else None
        outs.append(RequestOutput("r", step["text"], step["token_ids"], step.get("finish_reason"), prompt, made,
                                  cached_tokens=case.get("cached", 0), logprobs=logprobs))
    if not request.stream:
        return shaper.whole(outs)

    async def events():
        async def rest():
            for out in outs[1:]:
                yield out
        return [event async for event in shaper.events(outs[0], rest())]

    parsed = []
    for event in asyncio.run(events()):
        head, data = event.split("\n", 1)
        assert event.endswith("\n\n") and data.startswith("data: ")
        parsed.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return parsed


@pytest.mark.parametrize("name", list(VLLM))
def test_responses_api_has_vllms_shapes(name):
    """Whole responses and every stream event as vLLM 0.32's (ids and clocks aside), and the openai
    SDK's Response / ResponseStreamEvent types parse each of them."""
    case = VLLM[name]["case"]
    ours = _ours(case, VOCAB)
    assert _normal(ours) == _normal(VLLM[name]["vllm"])
    if isinstance(ours, dict):
        text = "".join(s["text"] for s in case["steps"])
        assert Response.model_validate(ours).output_text == ("" if case.get("parser") else text)
    else:
        events = [_EVENTS.validate_python(data) for _, data in ours]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert [e.type for e in events] == [kind for kind, _ in ours]


def test_input_items_become_the_chat_messages_vllm_renders():
    """instructions first as the system message, input_text parts joined by newlines, an earlier
    response's output item (as the SDK dumps it) fed back as the assistant's text, continued when
    its status is "incomplete" (vLLM's should_continue_final_message); text.format as response_format."""
    earlier = {"id": "msg_1", "content": [{"annotations": [], "text": "The sea", "type": "output_text",
                                           "logprobs": None}], "role": "assistant", "status": "incomplete",
               "type": "message", "phase": None}
    request = validated(ResponsesRequest, {
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 5, "text": {"format": {"type": "json_object"}},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                               {"type": "input_text", "text": "b"}]}, earlier]})
    body = chat_body_of(request)
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"},
                                {"role": "assistant", "content": "The sea"}]
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert body["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("asked, limit", [(5, 5), (10**6, 77), (None, 77)])
def test_max_output_tokens_is_lowered_to_the_servers_limit_as_vllm_lowers_it(asked, limit):
    """vLLM's min(max_output_tokens, default_max_tokens), never a refusal (chat refuses max_tokens
    over --max-tokens); the rest of the context lowers it further when the request starts."""
    request = validated(ResponsesRequest, {"model": "m", "input": "hi", "max_output_tokens": asked})
    body = validated(ChatRequest, chat_body_of(request))
    assert not body.max_tokens_given
    assert chat_params_of(chat_params, body, request, ServerConfig(max_tokens=77)).max_tokens == limit


@pytest.mark.parametrize("given, message", [
    (None, "must be a string or a list of message items; got null"),
    ({"role": "user", "content": "x"}, "must be a string or a list of message items; got an object"),
    ([{"role": "tool", "content": "x"}], "input[0].role: Input should be 'user', 'assistant', 'system' or 'developer'"),
    ([{"content": "x"}], "input[0].role: Field required"),
    ([{"role": "user", "content": None}], "input[0].content: must be a string or a list of content parts"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "input_text", "text": 5}]}],
     "input[1].content[0].text: Input should be a valid string"),
], ids=["null", "object", "tool_role", "no_role", "null_content", "int_text"])
def test_an_input_item_refusal_names_the_items_field(given, message):
    """A bad ``input`` is refused naming where in it it is wrong (the client reads <msg>, which names it,
    param "input"); pydantic's union named its first member only, whatever was wrong ("input.str:
    Input should be a valid string", param "input.str")."""
    with pytest.raises(RequestValidationError) as err:
        validated(ResponsesRequest, {"model": "m", "input": given})
    first = err.value.errors()[0]
    assert first["loc"] == ("input",) and first["msg"].startswith(message)


def _refusal(**fields) -> ParamError:
    with pytest.raises(ParamError) as err:
        chat_body_of(validated(ResponsesRequest, {"model": "m", "input": "hi", **fields}))
    return err.value


def test_the_sdks_stream_options_and_prompt_cache_options_are_taken_as_chats():
    """The openai SDK's responses.create(stream_options={"include_obfuscation": False}) and
    prompt_cache_options (which chat accepts) were 400 'unsupported field'; obfuscation asked, or
    stream_options without stream, is refused as chat refuses it; a json_object format with a
    schema is refused (the answer would not follow the schema)."""
    request = validated(ResponsesRequest, {"model": "m", "input": "hi", "stream": True, "prompt_cache_options": {
        "mode": "implicit"}, "stream_options": {"include_obfuscation": False}})
    assert chat_body_of(request)["stream"] is True
    assert _refusal(stream=True, stream_options={"include_obfuscation": True}).param == \
        "stream_options.include_obfuscation"
    assert _refusal(stream_options={"include_obfuscation": False}).param == "stream_options"
    refused = _refusal(text={"format": {"type": "json_object", "schema": {"type": "object"}}})
    assert refused.param == "text.format" and str(refused) == (  # it read "type 'json_schema''s fields"
        "text.format of type 'json_object' takes no 'schema' (name, schema, description and strict are fields of "
        "type 'json_schema')")


def test_a_schema_chat_refuses_before_compiling_is_blamed_on_text_format():
    """A schema nested past vLLM's 64 levels is refused naming text.format.schema, the request's
    field (it named chat's response_format.json, param response_format)."""
    schema = {"type": "string"}
    for _ in range(70):
        schema = {"type": "object", "properties": {"a": schema}}
    request = validated(ResponsesRequest, {"model": "m", "input": "hi", "text": {
        "format": {"type": "json_schema", "name": "deep", "schema": schema}}})
    with pytest.raises(RequestError) as err:
        chat_params_of(chat_params, validated(ChatRequest, chat_body_of(request)), request, ServerConfig())
    assert err.value.param == "text.format"
    assert str(err.value).startswith("text.format.schema: the JSON schema is nested too deeply")
