"""A chat content part (or a Responses input part) refused says what is wrong with it: a text part
without its text was told it was "a 'text' part: this server reads text parts only" (s30-hostile).
Unit level: the parts are refused before the tokenizer is read, so no tokenizer and no server."""

from __future__ import annotations

import pytest

from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.openai import chat_prompt
from nlora_serve.serving.http_api.request_models import ChatRequest, ParamError
from nlora_serve.serving.http_api.responses_chat import chat_body_of
from nlora_serve.serving.http_api.responses_request import ResponsesRequest


def _chat_refusal(part: dict) -> str:
    request = validated(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": [part]}]})
    with pytest.raises(ParamError) as err:
        chat_prompt(request, tokenizer=None)  # refused before the tokenizer is read
    assert err.value.param == "messages"
    return str(err.value)


@pytest.mark.parametrize("part, words", [
    ({"type": "text"}, "messages[0].content[0].text is missing or null: a text part carries its text as a string"),
    ({"type": "text", "text": None}, "messages[0].content[0].text is missing or null"),
    ({"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
     "messages[0].content[0] has fields other than 'type' and 'text' ('cache_control'): a text part takes only those"),
    ({"type": "image_url", "image_url": {"url": "http://x"}},
     "messages[0].content[0] is a 'image_url' part: this server reads text parts only"),
], ids=["no_text", "null_text", "extra_field", "image"])
def test_a_chat_part_refused_says_why(part, words):
    message = _chat_refusal(part)
    assert words in message, message
    if part["type"] == "text":
        assert "reads text parts only" not in message  # the old words, which blamed the part's type


def test_a_part_type_or_extra_field_name_of_a_megabyte_is_quoted_short():
    assert len(_chat_refusal({"type": "x" * 1_000_000})) < 400
    many = {"type": "text", "text": "hi", **{f"{i}" * 1000: 1 for i in range(10)}}
    message = _chat_refusal(many)
    assert len(message) < 600 and message.endswith("...', ...): a text part takes only those"), message


@pytest.mark.parametrize("part, words", [
    ({"type": "input_text"}, "input[0].content[0].text is missing or null: the part carries its text"),
    ({"type": "input_image", "image_url": "http://x"}, "input[0].content[0] is a 'input_image' part"),
], ids=["no_text", "image"])
def test_a_responses_part_refused_says_why(part, words):
    request = validated(ResponsesRequest, {"model": "m", "input": [{"role": "user", "content": [part]}]})
    with pytest.raises(ParamError) as err:
        chat_body_of(request)
    assert err.value.param == "input" and words in str(err.value), str(err.value)
