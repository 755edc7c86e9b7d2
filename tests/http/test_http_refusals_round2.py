"""Refusals found by the issue-16 review: the field at fault is named, unsupported fields are
refused at every value, and a 404 never tells a tenant without base-model access the base
model's name."""

from __future__ import annotations

import pytest
import requests

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from http_harness import base_url


def _post(server, path: str, body: dict, key: str = ADMIN_KEY) -> requests.Response:
    return requests.post(f"{base_url(server)}{path}", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})


def _chat(server, **fields) -> dict:
    return {"model": server.server.generation.info.model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1, **fields}


def _bad_request(resp: requests.Response, param: str) -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert param in error["message"], error
    return error["message"]


def test_top_logprobs_over_20_names_top_logprobs(http_server):
    message = _bad_request(_post(http_server, "/chat/completions", _chat(http_server, logprobs=True,
                                                                              top_logprobs=21)), "top_logprobs")
    assert "21" in message and "20" in message
    ok = _post(http_server, "/chat/completions", _chat(http_server, logprobs=True, top_logprobs=20))
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20


@pytest.mark.parametrize("value", [[], None, [{"type": "function", "function": {"name": "f"}}]])
def test_legacy_functions_are_refused_at_any_value(http_server, value):
    message = _bad_request(_post(http_server, "/chat/completions", _chat(http_server, functions=value)), "functions")
    assert "not" in message and "implement" in message


def test_an_unknown_field_is_refused_even_when_null(http_server):
    _bad_request(_post(http_server, "/chat/completions", _chat(http_server, no_such_field=None)), "no_such_field")


def test_a_404_names_the_base_model_only_to_callers_that_may_use_it(http_server):
    base = http_server.server.generation.info.model
    body = {"model": "inttune-nobody", "prompt": "Hi", "max_tokens": 1}
    hidden = _post(http_server, "/completions", body, TENANT_KEYS["tied-co"])  # granted inttune-*, no base
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found", hidden.text
    assert hidden.json()["error"]["param"] == "model"  # vLLM 0.32's _check_model names the field too
    assert base not in hidden.text and "inttune-nobody" in hidden.text
    shown = _post(http_server, "/completions", body, ADMIN_KEY)
    assert shown.status_code == 404 and base in shown.json()["error"]["message"]
