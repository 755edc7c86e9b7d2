"""The field a validation error names (HTTP ``param``) for union-typed fields: the field the client
sent, never pydantic's label of the union's first member ("tool_choice.str", "stop.str")."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from nlora_serve.serving.http_api.body import validated
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest
from nlora_serve.serving.http_api.responses_request import ResponsesRequest

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("kind, fields, loc, words", [
    (ChatRequest, {"tool_choice": 5}, ("tool_choice",),
     "Input should be a valid string (as str); or as dict[any,any]: Input should be a valid dictionary"),
    (ChatRequest, {"stop": 5}, ("stop",), "or as list[str]: Input should be a valid list"),
    (ChatRequest, {"stop": ["a", 5]}, ("stop",), "or as list[str]: at stop.1: Input should be a valid string"),
    (ChatRequest, {"messages": [{"role": "user", "content": 5}]}, ("messages", 0, "content"), "valid list"),
    (ChatRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     ("messages", 0, "content"), "at messages.0.content.0.text: Input should be a valid string"),
    (CompletionRequest, {"stop": 5}, ("stop",), "valid list"),
    (ResponsesRequest, {"tool_choice": 5}, ("tool_choice",), "valid dictionary"),
    # no union: as they were
    (ChatRequest, {"messages": [{"role": "user", "content": "Hi", "name": 5}]}, ("messages", 0, "name"),
     "Input should be a valid string"),
    (ChatRequest, {"logit_bias": {"1": "x"}}, ("logit_bias", "1"), "Input should be a valid number"),
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
