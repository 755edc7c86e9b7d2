"""What a vLLM/OpenAI user expects over HTTP: prompt + max_tokens over max_model_len runs with
max_tokens lowered to the rest of the context (vLLM 0.32's get_max_tokens), as an unset max_tokens
does on chat; a prompt that leaves no room is a 400 in vLLM's words; a forced unload ends whole
responses with a 409 and streams with an error event, naming the adapter version, other tenants'
streams untouched; the key (401) and the grant (403) are checked before the body is parsed."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx2
import openai
import pytest

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from http_harness import CASES, TENANTS, base_url, client, idle
from nlora_serve.client import NloraClient

TIED, LORA = TENANTS  # inttune-nystrom-tied (granted to tied-co), lora-rslora (lora-co)
MAX_MODEL_LEN = 1024  # grpc_harness.server_factory's engines


def _base(server) -> str:
    return server.server.generation.info.model


def _prompt(n: int) -> list[int]:
    return [1] + [30] * (n - 1)


def test_a_prompt_that_fills_the_context_is_400_in_vllms_words(http_server):
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, TENANT_KEYS["base-co"]).completions.create(model=_base(http_server),
                                                                      prompt=_prompt(1024), max_tokens=1)
    assert err.value.body["message"] == (
        "This model's maximum context length is 1024 tokens. However, you requested 1024 tokens in the "
        "messages. Please reduce the length of the messages.")
    assert idle(http_server)


def test_a_prompt_far_over_the_context_is_400_before_tokenizing(http_server, tokenizer):
    """Text longer than any MAX_MODEL_LEN tokens can spell is refused without tokenizing it (the
    tokenizer thread is shared by every request)."""
    from nlora_serve.engine.api import max_prompt_bytes

    bound = max_prompt_bytes(tokenizer, MAX_MODEL_LEN)
    start = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, TENANT_KEYS["base-co"]).completions.create(
            model=_base(http_server), prompt="lighthouse " * (bound // 11 + 1), max_tokens=1)
    assert f"refused before tokenizing above {bound:,} bytes" in err.value.body["message"]
    assert time.perf_counter() - start < 5.0 and idle(http_server)


def test_unset_or_over_the_context_max_tokens_is_the_rest_of_the_context(http_server, tokenizer):
    """vLLM 0.32's CompletionRequest.max_tokens defaults to 16 (null too), lowered to the context left
    (its get_max_tokens); chat's unset max_tokens is the rest of the context; a max_tokens over the
    context left is lowered to it as well, silently (1012 + 100 > 1024: the greedy tokens of the
    request without max_tokens; chat: one over the room its templated prompt leaves)."""
    api = client(http_server, TENANT_KEYS["base-co"])
    outs = []
    for prompt, extra, want in ((_prompt(1000), {}, 16), (_prompt(1012), {"max_tokens": None}, MAX_MODEL_LEN - 1012),
                                (_prompt(1012), {"max_tokens": 100}, MAX_MODEL_LEN - 1012)):
        out = api.completions.create(model=_base(http_server), prompt=prompt, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == want
        outs.append(out.choices[0].token_ids)
    assert outs[1] == outs[2] and len(outs[2]) == 12
    messages = [{"role": "user", "content": "hi " * 976}]  # 1007 tokens: 17 left
    prompt_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    unset, over = (api.chat.completions.create(model=_base(http_server), messages=messages, temperature=0,
                                               extra_body={"ignore_eos": True, **extra})
                   for extra in ({}, {"max_completion_tokens": MAX_MODEL_LEN - prompt_tokens + 1}))
    for out in (unset, over):
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == MAX_MODEL_LEN - prompt_tokens > 16
    assert over.choices[0].message.content == unset.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="you requested 1024 tokens in the messages"):
        api.completions.create(model=_base(http_server), prompt=_prompt(MAX_MODEL_LEN))


def test_min_tokens_over_the_context_left_names_min_tokens(http_server):
    # max_tokens unset: its default (16, or the room left, 10 tokens) must not show up as the culprit
    api = client(http_server, TENANT_KEYS["base-co"])
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=_base(http_server), prompt=_prompt(1014), extra_body={"min_tokens": 12})
    assert err.value.body["param"] == "min_tokens"
    assert err.value.body["message"] == ("min_tokens 12 is more than the 10 tokens of context left "
                                         "(max_model_len 1024, prompt 1014 tokens)")
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=_base(http_server), prompt=_prompt(10), extra_body={"min_tokens": 17})
    assert err.value.body["param"] == "min_tokens" and "defaults to 16" in err.value.body["message"]
    assert idle(http_server)


def _post(server, key: str | None, body: bytes) -> httpx2.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx2.post(f"{base_url(server)}/completions", content=body, headers=headers)


def test_a_json_body_sent_as_another_content_type_is_still_refused(http_server):
    body = json.dumps({"model": _base(http_server), "prompt": "Hi", "max_tokens": 2}).encode()
    headers = {"Authorization": f"Bearer {TENANT_KEYS['base-co']}", "Content-Type": "text/plain"}
    reply = httpx2.post(f"{base_url(http_server)}/completions", content=body, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize("key, body, status, code", [
    (None, b'{"model": "x", "prompt": [', 401, "unauthenticated"),  # not JSON
    ("not-a-key", b'{"model": "x", "prompt": [', 401, "unauthenticated"),
    (None, b'{"model": 5, "max_tokens": "5"}', 401, "unauthenticated"),  # JSON, fields of the wrong type
    (TENANT_KEYS["tied-co"], b'{"model": "lora-rslora", "prompt": "Hi", "max_tokens": "5"}', 403,
     "permission_denied"),  # not granted: 403 before the bad field, as for a well-formed body
    (TENANT_KEYS["tied-co"], b'{"model": "lora-rslora", "prompt": "Hi", "bogus": 1}', 403, "permission_denied"),
    (TENANT_KEYS["lora-co"], b'{"model": "lora-rslora", "prompt": "Hi", "max_tokens": "5"}', 400,
     "invalid_argument"),  # granted: the strict validation still refuses "5"
    (TENANT_KEYS["lora-co"], b'{"model": "lora-rslora", "prompt": [', 400, "invalid_argument"),
    (TENANT_KEYS["lora-co"], b'["model"]', 400, "invalid_argument"),
    (TENANT_KEYS["lora-co"], b'', 400, "invalid_argument"),
])
def test_key_and_grant_come_before_the_body_is_parsed(http_server, key, body, status, code):
    reply = _post(http_server, key, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    if status == 400 and body.startswith(b'{"model": "lora-rslora", "prompt": "Hi"'):
        assert error["param"] == "max_tokens"


def test_a_forced_unload_ends_whole_and_streamed_responses_with_the_reason(make_http_server):
    server = make_http_server()
    server.engine.adapters.register_dir(TIED, CASES / TIED)
    version = server.engine.adapters.registry.get(TIED)
    reason = (f"adapter '{TIED}' v{version.version} was unloaded by an operator (UnloadAdapter force=true) while "
              "this request ran; the request was aborted")
    tied, base = client(server, TENANT_KEYS["tied-co"]), client(server, TENANT_KEYS["base-co"])
    long = dict(model=TIED, prompt="Once upon a time", max_tokens=400, extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        whole = pool.submit(tied.completions.create, **long)
        stream = iter(tied.completions.create(stream=True, **long))
        next(stream)
        other = iter(base.chat.completions.create(model=_base(server), stream=True, max_tokens=30, temperature=0,
                                                  messages=[{"role": "user", "content": "Hi"}],
                                                  extra_body={"min_tokens": 30}))
        next(other)
        while version.refcount != 2:  # wait for the whole request to hold the adapter too
            time.sleep(0.01)
        with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
            assert admin.unload_adapter(TIED, force=True).aborted_requests == 2
        with pytest.raises(openai.ConflictError) as err:
            whole.result(60)
        assert err.value.status_code == 409 and err.value.body == {"message": reason, "type": "conflict_error",
                                                                   "param": None, "code": "aborted"}
        with pytest.raises(openai.APIError) as err:  # the error event in the SSE stream
            list(stream)
        assert err.value.message == reason and err.value.body["code"] == "aborted"
    rest = list(other)  # the other tenant's stream runs to its end
    assert rest[-1].choices[0].finish_reason == "length"
    assert sum(bool(c.choices[0].delta.content) for c in rest) >= 1
    assert version.refcount == 0 and idle(server)


def test_the_stream_error_event_is_openai_shaped(make_http_server):
    server = make_http_server()
    server.engine.adapters.register_dir(TIED, CASES / TIED)
    body = json.dumps({"model": TIED, "prompt": "Once upon a time", "max_tokens": 400, "stream": True,
                       "ignore_eos": True})
    headers = {"Authorization": f"Bearer {TENANT_KEYS['tied-co']}", "Content-Type": "application/json"}
    with httpx2.stream("POST", f"{base_url(server)}/completions", content=body, headers=headers) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
        with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
            admin.unload_adapter(TIED, force=True)
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    error = json.loads(events[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "aborted"
    assert f"adapter '{TIED}' v1 was unloaded" in error["message"]
