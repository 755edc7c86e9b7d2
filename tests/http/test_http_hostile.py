"""Found by the hostile review: bodies that are a 400 in OpenAI's error shape naming what is
wrong, never a 500, and the server answers the next request as before; prompts are tokenized off
the event loop."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import grpc
import pytest
import requests

from grpc_harness import ADMIN_KEY
from http_harness import base_url


def _raw(server, path: str, data: bytes | str) -> requests.Response:
    return requests.post(f"{base_url(server)}{path}", data=data, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})


def _chat_json(server, content: str = "Hi", **fields) -> str:
    """A chat body as JSON text; ``content`` is spliced in raw, so it may hold any JSON escape."""
    body = {"model": server.server.generation.info.model, "messages": [{"role": "user", "content": "@"}],
            "max_tokens": 1, "temperature": 0, **fields}
    return json.dumps(body).replace('"@"', f'"{content}"')


def _refused(resp: requests.Response, param: str | None, *words: str) -> None:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert all(word in error["message"] for word in words), error


@pytest.mark.parametrize("content", ["\\ud800", "a\\udfffb", "\\ud83d"])  # lone halves of a pair
def test_a_lone_surrogate_is_a_400(http_server, content):
    _refused(_raw(http_server, "/chat/completions", _chat_json(http_server, content)), None, "surrogate")
    completion = _chat_json(http_server).replace('"messages": [{"role": "user", "content": "Hi"}]',
                                                 f'"prompt": "{content}"')
    _refused(_raw(http_server, "/completions", completion), None, "surrogate")


def test_a_surrogate_in_utf8_bytes_or_in_utf16_json_is_a_400(http_server):
    # json.loads(bytes) decodes with surrogatepass, and a UTF-16 body hides the escape from a bytes search
    encoded = _chat_json(http_server, "Hi @").encode().replace(b"@", "\ud800".encode("utf-8", "surrogatepass"))
    resp = _raw(http_server, "/chat/completions", encoded)
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"], resp.text
    _refused(_raw(http_server, "/chat/completions", _chat_json(http_server, "\\ud800").encode("utf-16")), None,
             "surrogate")
    assert _raw(http_server, "/chat/completions", _chat_json(http_server).encode("utf-16")).status_code == 200


def test_a_surrogate_pair_is_text(http_server):
    resp = _raw(http_server, "/chat/completions", _chat_json(http_server, "\\ud83d\\ude00"))  # U+1F600, escaped
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 1


def test_json_nested_past_the_parser_is_a_400(http_server):
    _refused(_raw(http_server, "/chat/completions", "[" * 100_000 + "]" * 100_000), None, "nested")
    assert _raw(http_server, "/chat/completions", _chat_json(http_server)).status_code == 200


@pytest.mark.parametrize("fields, param", [({"top_k": 1 << 63}, "top_k"),
                                           ({"min_tokens": 1, "stop_token_ids": [49152]}, "stop_token_ids"),
                                           ({"stop_token_ids": [1 << 63]}, "stop_token_ids")])
def test_ids_past_the_vocabulary_or_int64_are_a_400(http_server, fields, param):
    _refused(_raw(http_server, "/chat/completions", _chat_json(http_server, **fields)), param, param)


@pytest.mark.parametrize("body, content_type, words", [
    (None, "application/x-www-form-urlencoded", ("Content-Type 'application/x-www-form-urlencoded' is not JSON",
                                                 "'Content-Type: application/json'")),  # what `curl -d` sends
    (None, "text/plain; charset=utf-8", ("Content-Type 'text/plain' is not JSON",)),
    (b"", "application/json", ("the request body is empty; expected a JSON object",)),
    (b"[]", "application/json", ("expected a JSON object, got an array: []",)),
    (b"null", "application/json", ("expected a JSON object, got null",)),
    (b'"Hi"', "application/json", ('expected a JSON object, got a string: "Hi"',)),
])
def test_a_body_that_is_no_json_object_is_a_400_naming_why(http_server, body, content_type, words):
    # pydantic's "Input should be a valid dictionary or instance of ChatRequest" named none of these
    body = _chat_json(http_server) if body is None else body
    resp = requests.post(f"{base_url(http_server)}/chat/completions", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": content_type})
    _refused(resp, None, *words)
    assert _raw(http_server, "/chat/completions", _chat_json(http_server)).status_code == 200


@pytest.mark.parametrize("encoding", ["gzip", "br", "identity, gzip", "x" * 300])
def test_an_encoded_body_is_refused_naming_its_content_encoding_before_it_is_read(encoding):
    """Nothing decodes a Content-Encoding: a gzip body was "not valid JSON (at character 1)"; it is
    refused (400, as vLLM's JSON decode error) before its body is read, the header's value cut."""
    import asyncio

    from fastapi.exceptions import RequestValidationError
    from starlette.requests import Request

    from nlora_serve.serving.http_api.generate import read_body

    async def receive():
        raise AssertionError("the body was read")

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions",
                       "headers": [(b"content-encoding", encoding.encode())]}, receive)
    with pytest.raises(RequestValidationError) as refused:
        asyncio.run(read_body(request, admission=None))
    message = refused.value.errors()[0]["msg"]
    assert message == (f"the request body's Content-Encoding {encoding[:40] + '...' * (len(encoding) > 40)!r} is "
                       "not supported; send the JSON body uncompressed, without a Content-Encoding header")


def test_a_repeated_content_encoding_header_is_read_whole_and_identity_in_any_case_passes():
    """Two Content-Encoding lines ("identity", then "gzip") are one list (RFC 9110 5.3): the first
    line alone let the gzip body through to "not valid JSON". "IDENTITY" is identity."""
    import asyncio

    from fastapi.exceptions import RequestValidationError
    from starlette.requests import Request

    from nlora_serve.serving.http_api.generate import read_body

    async def receive():
        raise AssertionError("the body was read")

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions",
                       "headers": [(b"content-encoding", b"identity"), (b"content-encoding", b"gzip")]}, receive)
    with pytest.raises(RequestValidationError) as refused:
        asyncio.run(read_body(request, admission=None))
    assert "Content-Encoding 'identity, gzip' is not supported" in refused.value.errors()[0]["msg"]
    from nlora_serve.serving.http_api.body import check_content_encoding
    assert check_content_encoding("IDENTITY") is None and check_content_encoding(" Identity ,identity") is None


def test_a_gzip_body_is_a_400_and_identity_is_served(http_server):
    import gzip
    url, key = f"{base_url(http_server)}/chat/completions", {"Authorization": f"Bearer {ADMIN_KEY}"}
    resp = requests.post(url, data=gzip.compress(_chat_json(http_server).encode()), timeout=60,
                         headers={**key, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    _refused(resp, None, "the request body's Content-Encoding 'gzip' is not supported")
    resp = requests.post(url, data=_chat_json(http_server), timeout=60,
                         headers={**key, "Content-Type": "application/json", "Content-Encoding": "identity"})
    assert resp.status_code == 200, resp.text


def _gated(monkeypatch, owner, method: str) -> tuple[threading.Event, threading.Event]:
    """Make ``owner.method`` wait for ``release`` (at most 30 s) once called; ``entered`` is set then."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(owner, method)

    def wait_then_run(*args, **kwargs):
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, wait_then_run)
    return entered, release


def _grpc_generate(server, **prompt) -> list:
    from nlora_serve.proto import nlora_pb2 as pb
    from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
    with grpc.insecure_channel(server.target) as channel:
        request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=1), **prompt)
        return list(pb_grpc.GenerationStub(channel).Generate(request, metadata=[("authorization",
                                                                                 f"Bearer {ADMIN_KEY}")]))


@pytest.mark.parametrize("front, tokenizer_of", [("http-chat", "frontend"), ("http-text", "engine"),
                                                 ("grpc-chat", "frontend"), ("grpc-text", "engine")])
def test_the_event_loop_serves_on_while_a_prompt_is_tokenized(http_server, tokenizer, monkeypatch, front,
                                                              tokenizer_of):
    # a 16 MiB prompt tokenizes for ~30 s; on the event loop that froze every stream of every tenant
    owner = tokenizer if tokenizer_of == "frontend" else http_server.engine.tokenizer
    entered, release = _gated(monkeypatch, owner, "apply_chat_template" if front.endswith("chat") else "encode")
    base = http_server.server.generation.info.model
    message = {"role": "user", "content": "Hi"}
    send = {"http-chat": lambda: _raw(http_server, "/chat/completions", _chat_json(http_server)).status_code,
            "http-text": lambda: _raw(http_server, "/completions", json.dumps(
                {"model": base, "prompt": "Hi", "max_tokens": 1})).status_code,
            "grpc-chat": lambda: len(_grpc_generate(http_server, chat={"messages": [message]})),
            "grpc-text": lambda: len(_grpc_generate(http_server, text="Hi"))}[front]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(send)
        try:
            assert entered.wait(30), "the request never reached the tokenizer"
            health = requests.get(f"http://127.0.0.1:{http_server.server.http_port}/health", timeout=5)
            assert health.status_code == 200
        finally:
            release.set()
        assert slow.result(timeout=60) in (200, 1)


def test_chat_contents_past_any_context_are_refused_before_tokenizing(http_server, tokenizer, monkeypatch):
    """Raw prompts were bounded before tokenizing, chat contents not: two 14 MB messages held the
    front ends' one tokenizer thread and another tenant's 'Hi' waited 10.7 s."""
    # every token spells at most its longest vocabulary entry (x4 slack for normalisers)
    bound = 4 * max(len(t) for t in tokenizer.get_vocab()) * http_server.engine.max_model_len
    half = "a" * (bound // 2 + 1)  # two messages, together one character past the bound
    messages = [{"role": "system", "content": half}, {"role": "user", "content": half}]

    def never(*args, **kwargs):
        raise AssertionError("the chat was rendered")
    monkeypatch.setattr(tokenizer, "apply_chat_template", never)
    said = f"hold {2 * len(half):,} bytes of content (UTF-8): more tokens than the model's context holds"
    _refused(_raw(http_server, "/chat/completions", _chat_json(http_server, messages=messages)), "messages", said,
             f"above {bound:,} bytes")
    with pytest.raises(grpc.RpcError) as err:
        _grpc_generate(http_server, chat={"messages": messages})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and said in err.value.details(), err.value
    monkeypatch.undo()
    assert _raw(http_server, "/chat/completions", _chat_json(http_server)).status_code == 200


def test_more_chat_messages_than_context_tokens_are_refused_before_rendering(http_server, tokenizer, monkeypatch):
    """300k empty messages (10 MB of JSON, no content to bound) held the tokenizer thread 7 s;
    each message renders at least its turn marker, so max_model_len + 1 of them never fit."""
    max_model_len = 1024  # grpc_harness's SchedulerConfig
    assert http_server.engine.max_model_len == max_model_len
    messages = [{"role": "user", "content": ""}] * (max_model_len + 1)

    def never(*args, **kwargs):
        raise AssertionError("the chat was rendered")
    monkeypatch.setattr(tokenizer, "apply_chat_template", never)
    said = f"holds {max_model_len + 1:,} messages: more turns than the model's context holds tokens"
    _refused(_raw(http_server, "/chat/completions", _chat_json(http_server, messages=messages)), "messages", said)
    with pytest.raises(grpc.RpcError) as err:
        _grpc_generate(http_server, chat={"messages": messages})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and said in err.value.details(), err.value


def test_a_max_tokens_over_the_servers_cap_is_lowered_to_it_as_vllm_lowers():
    """A max_tokens over --max-tokens was a 400 (a 400-digit one once came back whole in it); vLLM
    0.32 lowers it silently to its override_max_tokens, so a client sending 4,096 to a default
    server (2,048) was refused where vLLM serves it: now lowered, the generation config's cap too."""
    from nlora_serve.serving.generation_config import SamplingDefaults
    from nlora_serve.serving.request_policy import max_tokens_of
    from nlora_serve.serving.server_config import ServerConfig

    config = ServerConfig(max_tokens=2048)
    assert [max_tokens_of(n, config) for n in (int("9" * 400), 4096, 2049, 2048, 100)] == [2048, 2048, 2048, 2048, 100]
    capped = ServerConfig(max_tokens=2048, sampling_defaults=SamplingDefaults(max_tokens_cap=300))
    assert [max_tokens_of(n, capped) for n in (4096, 300, 299)] == [300, 300, 299]


@pytest.mark.parametrize("min_tokens", [4294967295, 2049])
def test_min_tokens_over_the_cap_with_max_tokens_unset_names_no_max_tokens_never_sent(http_server, min_tokens):
    """With max_tokens unset the refusal read "must be an integer in [0, max_tokens=2048]", a
    max_tokens the client never sent: it now says what max_tokens is when unset, on both front ends."""
    unset = (f"must be an integer in [0, 2048]; got {min_tokens} (max_tokens is unset: it defaults to the "
             "rest of the context, capped at the server's --max-tokens 2048)")
    body = {"model": http_server.server.generation.info.model, "messages": [{"role": "user", "content": "hi"}],
            "min_tokens": min_tokens}  # chat: /v1/completions' unset max_tokens is 16 (test_http_context_abort_auth)
    resp = requests.post(f"{base_url(http_server)}/chat/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 400 and resp.json()["error"]["message"] == f"min_tokens {unset}", resp.text
    assert resp.json()["error"]["param"] == "min_tokens"
    from nlora_serve.proto import nlora_pb2 as pb
    from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
    with grpc.insecure_channel(http_server.target) as channel, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(min_tokens=min_tokens)),
            metadata=[("authorization", f"Bearer {ADMIN_KEY}")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"SamplingParams.min_tokens {unset}"


def test_min_tokens_over_a_max_tokens_the_client_sent_still_names_it(http_server):
    body = {"model": http_server.server.generation.info.model, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}
    resp = requests.post(f"{base_url(http_server)}/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["message"] == "min_tokens must be an integer in [0, max_tokens=4]; got 5"


@pytest.mark.parametrize("path, prompt", [("/completions", {"prompt": "Hi"}),
                                          ("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_stream_and_token_ids_as_tokens_at_null_are_their_defaults(http_server, tokenizer, path, prompt):
    """s30-hostile: ``"stream": null`` and ``"return_tokens_as_token_ids": null`` were a 400 ("Input
    should be a valid boolean, got null"), where vLLM (``bool | None``) and OpenAI ("boolean or
    null") take null as false: a whole JSON answer whose logprob tokens are the tokens' text."""
    chat = path == "/chat/completions"
    body = {"model": http_server.server.generation.info.model, **prompt, "max_tokens": 3, "temperature": 0,
            "stream": None, "return_tokens_as_token_ids": None, "return_token_ids": True,
            "logprobs": True if chat else 0}
    resp = requests.post(f"{base_url(http_server)}{path}", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json"), resp.text
    choice = resp.json()["choices"][0]
    tokens = [e["token"] for e in choice["logprobs"]["content"]] if chat else choice["logprobs"]["tokens"]
    assert len(choice["token_ids"]) == 3 and tokens == [tokenizer.decode([t]) for t in choice["token_ids"]]


@pytest.mark.parametrize("include_usage", [None, True])
def test_stream_options_at_null_are_their_defaults(http_server, include_usage):
    """s30-hostile: ``stream_options`` ``{"include_usage": null}`` (or ``continuous_usage_stats``)
    was a 400, where vLLM's StreamOptions (``bool | None``) takes null as false: null sends no usage
    chunk; true with ``continuous_usage_stats`` null sends one closing usage chunk only, its
    completion_tokens the tokens streamed."""
    body = {"model": http_server.server.generation.info.model, "prompt": "Hi", "max_tokens": 3, "temperature": 0,
            "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": include_usage, "continuous_usage_stats": None}}
    resp = requests.post(f"{base_url(http_server)}/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 200, resp.text
    chunks = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: {")]
    streamed = sum(len(c["choices"][0]["token_ids"] or []) for c in chunks if c["choices"])
    usages = [c["usage"] for c in chunks if c.get("usage")]
    assert streamed == 3 and resp.text.rstrip().endswith("data: [DONE]")
    if include_usage:
        assert len(usages) == 1 and not chunks[-1]["choices"] and usages[0]["completion_tokens"] == streamed
    else:
        assert usages == []


# Gemma's refusal of a system turn, as its template writes it (Mistral's and Llama 2's alternate-roles check alike)
_REFUSING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                      "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}<|im_start|>assistant\n")


@pytest.mark.parametrize("template, said", [
    (_REFUSING_TEMPLATE, "System role not supported"),
    ("{{ messages[0]['content'] + 5 }}", 'can only concatenate str (not "int") to str'),  # a TypeError rendering
], ids=["raise_exception", "type_error"])
def test_a_chat_template_that_refuses_the_messages_is_a_400_naming_them(http_server, tokenizer, monkeypatch,
                                                                        template, said):
    """s30-hostile: a model's template that refuses the messages (its ``raise_exception``: Gemma's
    system role, Mistral's alternating roles) or fails rendering them raised jinja2's TemplateError
    or a TypeError through the front ends: a 500 on HTTP, INTERNAL on gRPC. vLLM answers 400."""
    monkeypatch.setattr(tokenizer, "chat_template", template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    words = f"messages: the model's chat template cannot render these messages: {said}"
    _refused(_raw(http_server, "/chat/completions", _chat_json(http_server, messages=messages)), "messages", words)
    with pytest.raises(grpc.RpcError) as err:
        _grpc_generate(http_server, chat={"messages": messages})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details(), err.value
    monkeypatch.undo()
    assert _raw(http_server, "/chat/completions", _chat_json(http_server, messages=messages)).status_code == 200
