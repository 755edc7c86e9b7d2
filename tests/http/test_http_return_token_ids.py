"""vLLM's ``return_token_ids`` and ``request_id`` over HTTP: the prompt's ids equal the tokenizer's
(transformers' encode / apply_chat_template), each choice's ids decode to its text and equal its
logprob tokens, a stream's ids join to the whole answer's (same seed), and the response id is
``cmpl-<request_id>`` / ``chatcmpl-<request_id>``, the X-Request-Id header winning, as vLLM 0.32."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import requests

from grpc_harness import TENANT_KEYS
from http_harness import base_url

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _post(server, path: str, body: dict, headers: dict | None = None) -> requests.Response:
    body = {"model": server.server.generation.info.model, "max_tokens": 8, "temperature": 1.0, "seed": 5,
            "ignore_eos": True, **body}
    return requests.post(f"{base_url(server)}{path}", json=body, timeout=120,
                         headers={"Authorization": f"Bearer {TENANT_KEYS['base-co']}", **(headers or {})})


def _events(resp: requests.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completions_token_ids_whole_and_streamed(http_server, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    whole = _post(http_server, "/completions", {"prompt": PROMPT, "n": 2, "return_token_ids": True, "logprobs": 0,
                                                 "return_tokens_as_token_ids": True}).json()
    for choice in whole["choices"]:
        assert choice["prompt_token_ids"] == prompt_ids
        assert tokenizer.decode(choice["token_ids"]) == choice["text"] and len(choice["token_ids"]) == 8
        assert choice["token_ids"] == [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    chunks = _events(_post(http_server, "/completions", {"prompt": PROMPT, "n": 2, "return_token_ids": True,
                                                          "stream": True}))
    for index, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        # vLLM's: the prompt's ids on a choice's first chunk, null on the others
        assert mine[0]["prompt_token_ids"] == prompt_ids and all(c["prompt_token_ids"] is None for c in mine[1:])
        assert [t for c in mine for t in c["token_ids"]] == choice["token_ids"]
    plain = _post(http_server, "/completions", {"prompt": PROMPT}).json()["choices"][0]
    assert plain["token_ids"] is None and plain["prompt_token_ids"] is None  # not asked: null, as vLLM's


def test_chat_token_ids_whole_and_streamed(http_server, tokenizer):
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    whole = _post(http_server, "/chat/completions", {"messages": MESSAGES, "return_token_ids": True}).json()
    assert whole["prompt_token_ids"] == prompt_ids
    choice = whole["choices"][0]
    assert tokenizer.decode(choice["token_ids"]) == choice["message"]["content"] and len(choice["token_ids"]) == 8
    chunks = _events(_post(http_server, "/chat/completions", {"messages": MESSAGES, "return_token_ids": True,
                                                              "stream": True}))
    assert chunks[0]["prompt_token_ids"] == prompt_ids and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == choice["token_ids"]


def test_request_id_names_the_response_and_vllms_no_op_fields_are_taken(http_server):
    assert _post(http_server, "/completions", {"prompt": PROMPT, "request_id": "abc-1"}).json()["id"] == "cmpl-abc-1"
    chat = _post(http_server, "/chat/completions", {"messages": MESSAGES, "request_id": "abc-2"},
                 headers={"X-Request-Id": "from-header"})
    assert chat.json()["id"] == "chatcmpl-from-header"
    # the same id twice at once: the engine's own ids stay distinct
    with ThreadPoolExecutor(2) as pool:
        streams = list(pool.map(lambda _: _post(http_server, "/completions", {"prompt": PROMPT, "request_id": "same",
                                                                              "max_tokens": 64, "stream": True}),
                                range(2)))
    assert all(resp.status_code == 200 for resp in streams)
    assert all(c["id"] == "cmpl-same" for resp in streams for c in _events(resp))
    # vLLM's session_id (KV-transfer routing) changes nothing: accepted, the same answer
    assert _post(http_server, "/completions", {"prompt": PROMPT, "session_id": "s1"}).json()["choices"][0]["text"] \
        == _post(http_server, "/completions", {"prompt": PROMPT}).json()["choices"][0]["text"]
    # vLLM's thinking_token_budget: unset (null, -1) without a reasoning parser, else its refusal
    for budget, status in ((None, 200), (-1, 200), (100, 400)):
        resp = _post(http_server, "/completions", {"prompt": PROMPT, "thinking_token_budget": budget})
        assert resp.status_code == status and (status == 200 or "--reasoning-parser" in resp.json()["error"]["message"])
    too_long = _post(http_server, "/completions", {"prompt": PROMPT, "request_id": "x" * 1025})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "request_id"
