"""The OpenAI-compatible API's contract, through the official client: /v1/models per key, /health,
OpenAI-shaped errors (401/403/404/400), metrics with frontend="http", and a client that goes away
mid-request freeing the request's KV blocks and adapter pin at once (response objects' shapes
against vLLM's own: test_http_vllm_shapes.py)."""

from __future__ import annotations

import json
import logging
import re

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from http_harness import TENANTS, base_url, client, idle, scrape
from nlora_serve.client import NloraClient, PermissionDenied
from nlora_serve.log_format import JsonFormatter
from nlora_serve.serving.auth import hash_key
from nlora_serve.serving.request_log import RequestLog, quoted
from nlora_serve.serving.http_api.server import MAX_BODY_BYTES

TIED, LORA = TENANTS  # inttune-nystrom-tied (granted to tied-co), lora-rslora (lora-co)
HTTP = ("frontend", "http")


def _base(server) -> str:
    return server.server.generation.info.model


@pytest.mark.parametrize("key, want", [
    (TENANT_KEYS["tied-co"], {TIED}),  # inttune-* and no base model
    (TENANT_KEYS["lora-co"], {"BASE", LORA}),
    (TENANT_KEYS["base-co"], {"BASE"}),
    (ADMIN_KEY, {"BASE", TIED, LORA}),
])
def test_models_lists_exactly_the_keys_grants(http_server, key, want):
    models = client(http_server, key).models.list().data
    assert sorted(m.id for m in models) == sorted(_base(http_server) if name == "BASE" else name for name in want)
    assert [m.max_model_len for m in models] == [1024] * len(want)  # vLLM's field; the harness's max_model_len


@pytest.mark.parametrize("key, granted", [
    (TENANT_KEYS["tied-co"], {TIED}),
    (TENANT_KEYS["lora-co"], {"BASE", LORA}),
    (ADMIN_KEY, {"BASE", TIED, LORA}),
])
def test_models_retrieve_answers_a_granted_name_and_404s_every_other_alike(http_server, key, granted):
    # A newcomer's find: the openai client's models.retrieve("lower") got a bare "Not Found".
    caller = client(http_server, key)
    names = {_base(http_server) if name == "BASE" else name: name for name in ("BASE", TIED, LORA)}
    for name, role in names.items():
        if role in granted:
            got = caller.models.retrieve(name)
            assert (got.id, got.object, got.owned_by) == (name, "model", "nlora-serve")
            # vLLM's ModelCard field, on every entry: the harness's SchedulerConfig(max_model_len=1024)
            assert got.max_model_len == 1024
            # an adapter's parent names the base model only to a key granted the base model
            assert got.parent == (_base(http_server) if role != "BASE" and "BASE" in granted else None)
            continue
        with pytest.raises(openai.NotFoundError) as err:  # exists, not granted: as a name that does not exist
            caller.models.retrieve(name)
        assert err.value.body["message"] == (f"the model {name!r} does not exist or this key may not use it "
                                             "(GET /v1/models lists those it may use)")
    with pytest.raises(openai.NotFoundError) as err:
        caller.models.retrieve("nobody")
    assert err.value.body == {"message": "the model 'nobody' does not exist or this key may not use it "
                                         "(GET /v1/models lists those it may use)",
                              "type": "not_found_error", "param": "model", "code": "not_found"}
    with pytest.raises(openai.AuthenticationError):
        client(http_server, "not-a-key").models.retrieve(TIED)


def test_errors_have_the_openai_shape_and_status(http_server):
    base = _base(http_server)
    tied = client(http_server, TENANT_KEYS["tied-co"])
    with pytest.raises(openai.AuthenticationError) as err:
        client(http_server, "not-a-key").completions.create(model=base, prompt="Hi", max_tokens=2)
    assert err.value.body["code"] == "unauthenticated" and err.value.body["type"] == "authentication_error"
    # one wording for the base model's name and an adapter's: a key not granted the base model
    # cannot tell which name is the base model's
    with pytest.raises(openai.PermissionDeniedError, match=f"not granted model '{base}'"):
        tied.completions.create(model=base, prompt="Hi", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError, match=f"not granted model '{LORA}'"):
        tied.chat.completions.create(model=LORA, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="'inttune-nobody' is not registered") as err:  # granted by pattern
        tied.completions.create(model="inttune-nobody", prompt="Hi", max_tokens=2)
    assert set(err.value.body) == {"message", "type", "param", "code"} and err.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):  # an admin may use every name: still 404, never the base model
        client(http_server, ADMIN_KEY).completions.create(model="nobody", prompt="Hi", max_tokens=2)


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 0}, "n"),
    ({"logit_bias": {"42": 101}}, "logit_bias"),  # OpenAI's range is [-100, 100]
    ({"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ({"temperature": 101}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"max_tokens": -1}, "max_tokens"),  # (one over the server's --max-tokens is lowered to it, as in vLLM)
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": ["one", [1, 2]]}, "prompt"),  # a batch mixing texts and token-id lists
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"seed": 1 << 64}, "seed"),  # beyond torch's generator: once killed the engine thread
    ({"seed": -(1 << 63) - 1}, "seed"),  # vLLM's range is int64's; below it nothing is a generator
    ({"max_tokens": "5"}, "max_tokens"),  # strings and booleans are refused, never coerced
    ({"extra_body": {"temperature": True}}, "temperature"),
    ({"extra_body": {"top_k": -2}}, "top_k"),  # -1 and 0 are off (vLLM's values); below is refused
])
def test_bad_or_unsupported_fields_are_refused_naming_them(http_server, kwargs, param):
    request = {"model": _base(http_server), "prompt": "Hi", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, TENANT_KEYS["base-co"]).completions.create(**request)
    assert err.value.body["param"] == param and param in err.value.body["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"tools": []}, "tools"),  # vLLM's "must not be an empty array"
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # without its json_schema
])
def test_bad_chat_requests_are_refused_naming_the_field(http_server, kwargs, param):
    request = {"model": _base(http_server), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
               **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, TENANT_KEYS["base-co"]).chat.completions.create(**request)
    assert err.value.body["param"] == param


def test_text_that_is_not_unicode_and_bad_json_are_400_and_the_server_serves_on(http_server):
    # Raw bodies: the openai client cannot even encode a lone surrogate.
    import httpx2

    api = client(http_server, TENANT_KEYS["base-co"])
    headers = {"Authorization": f"Bearer {TENANT_KEYS['base-co']}", "Content-Type": "application/json"}
    surrogate = json.dumps({"model": _base(http_server), "prompt": "hi\ud800", "max_tokens": 2})  # ASCII escape
    for body, says in ((surrogate.encode(), "not valid Unicode"), (b'{"model": "x", "prompt": [', "not valid JSON")):
        reply = httpx2.post(f"{api.base_url}completions", content=body, headers=headers)
        assert reply.status_code == 400 and says in reply.json()["error"]["message"], reply.text
    assert reply.json()["error"]["param"] is None  # not the character offset
    out = api.completions.create(model=_base(http_server), prompt="Hi", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2


def test_a_closed_stream_frees_its_blocks_and_adapter_at_once(http_server):
    lora = client(http_server, TENANT_KEYS["lora-co"])
    stream = lora.completions.create(model=LORA, prompt="Once upon a time", max_tokens=500, stream=True,
                                     extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks), next(chunks)
    version = http_server.engine.adapters.registry.get(LORA)
    assert http_server.engine.stats()["kv_blocks_used"] >= 1 and version.refcount == 1
    finished_before = scrape(http_server)[("nlora_request_duration_seconds_count", (HTTP,))]
    stream.close()
    assert idle(http_server) and version.refcount == 0
    # aborted, not run to its 500 tokens: a finished request would count a duration
    assert scrape(http_server)[("nlora_request_duration_seconds_count", (HTTP,))] == finished_before


def test_a_client_that_times_out_on_a_whole_response_frees_it(http_server):
    impatient = client(http_server, TENANT_KEYS["base-co"], timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=_base(http_server), prompt="Once upon a time", max_tokens=500,
                                     extra_body={"ignore_eos": True})
    assert idle(http_server)


def test_metrics_move_with_frontend_http(http_server):
    before = scrape(http_server)
    base_co = client(http_server, TENANT_KEYS["base-co"])
    answer = base_co.completions.create(model=_base(http_server), prompt="Hi", max_tokens=4, temperature=0,
                                        extra_body={"min_tokens": 4})
    with pytest.raises(openai.PermissionDeniedError):
        base_co.completions.create(model=LORA, prompt="Hi", max_tokens=4)
    after = scrape(http_server)

    def moved(name: str, *labels: tuple[str, str]) -> float:
        key = (name, tuple(sorted((HTTP, *labels))))
        return after[key] - before[key]

    assert moved("nlora_request_duration_seconds_count") == moved("nlora_time_to_first_token_seconds_count") == 1
    assert moved("nlora_generation_tokens_total") == answer.usage.completion_tokens == 4
    assert moved("nlora_prompt_tokens_total") == answer.usage.prompt_tokens
    assert moved("nlora_requests_rejected_total", ("reason", "permission_denied")) == 1
    grpc = [k for k in after if ("frontend", "grpc") in k[1]]
    assert grpc and all(after[k] == before[k] for k in grpc)  # nothing came in over gRPC


def test_without_tenant_metrics_a_scrape_has_no_tenant_series(http_server):
    # the default (per-tenant counters are opt-in, serve --tenant-metrics: DESIGN §6): after a
    # tenant's finished and refused requests on both front ends, no nlora_tenant_ line at all
    before = scrape(http_server)
    base_co = client(http_server, TENANT_KEYS["base-co"])
    base_co.completions.create(model=_base(http_server), prompt="Hi", max_tokens=1)
    with pytest.raises(openai.PermissionDeniedError):
        base_co.completions.create(model=LORA, prompt="Hi", max_tokens=1)
    with NloraClient(http_server.target, api_key=TENANT_KEYS["base-co"], timeout=60) as grpc_client:
        grpc_client.complete([1, 9690, 198], max_tokens=1)
        with pytest.raises(PermissionDenied):
            list(grpc_client.generate([1, 9690, 198], adapter=LORA, max_tokens=1))
    text = httpx2.get(base_url(http_server).removesuffix("/v1") + "/metrics").text
    assert "nlora_tenant_" not in text
    after = scrape(http_server)
    for frontend in ("http", "grpc"):
        key = (("frontend", frontend),)
        assert after[("nlora_request_duration_seconds_count", key)] == \
            before[("nlora_request_duration_seconds_count", key)] + 1
        refused = ("nlora_requests_rejected_total", (("frontend", frontend), ("reason", "permission_denied")))
        assert after[refused] == before[refused] + 1


def test_a_body_over_the_limit_is_413_before_it_is_read(http_server):
    huge = "x" * (MAX_BODY_BYTES + 1)
    refused = ("nlora_requests_rejected_total", (("frontend", "http"), ("reason", "request_too_large")))
    invalid = ("nlora_requests_rejected_total", (("frontend", "http"), ("reason", "invalid_argument")))
    before = scrape(http_server)
    assert before[refused] == 0  # the series exists from the start, as every reason's does
    with pytest.raises(openai.APIStatusError) as err:
        client(http_server, TENANT_KEYS["base-co"]).completions.create(model=_base(http_server), prompt=huge)
    assert err.value.status_code == 413 and "request body over" in err.value.body["message"]
    assert err.value.body["code"] == "request_too_large"
    after = scrape(http_server)  # counted under the code the body gives, not as invalid_argument
    assert (after[refused], after[invalid]) == (before[refused] + 1, before[invalid])
    reply = httpx2.get(f"{base_url(http_server)}/nosuch/route")  # a route we do not serve
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"


# What this server serves, as the README's "OpenAI-compatible HTTP" lists it (written out here, not
# read from the app); /v1/load_lora_adapter and /v1/unload_lora_adapter exist off too (404 naming the flag)
SERVED = ("GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model}", "POST /v1/completions",
          "POST /v1/chat/completions", "POST /v1/responses", "POST /tokenize", "POST /detokenize", "POST /v1/load_lora_adapter",
          "POST /v1/unload_lora_adapter", "GET /version")


@pytest.mark.parametrize("method, path", [("POST", "/v1/embeddings"), ("POST", "/v1/chat/completion"),
                                          ("GET", "/v1")])
def test_a_path_not_served_is_404_listing_what_is(http_server, method, path):
    # A newcomer's find: vLLM's /v1/embeddings (or a typo) got a bare "Not Found", no word of what is served
    reply = httpx2.request(method, base_url(http_server).removesuffix("/v1") + path)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found"
    assert reply.json()["error"]["message"] == f"no endpoint {method} {path}; this server serves " + ", ".join(SERVED)


def test_a_method_a_path_does_not_take_is_405_naming_the_one_it_does(http_server):
    reply = httpx2.get(f"{base_url(http_server)}/chat/completions")
    assert reply.status_code == 405 and reply.json()["error"]["code"] == "method_not_allowed"
    assert reply.json()["error"]["message"] == "GET /v1/chat/completions: this endpoint takes POST"


def test_metrics_on_the_http_port_without_a_key(http_server):
    """vLLM serves /metrics on its API port; so do we, keyless even with auth on, the same registry
    as --metrics-port (an unkeyed scrape must not count as a refused request)."""
    url = base_url(http_server).removesuffix("/v1") + "/metrics"
    reply = httpx2.get(url)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    on_api_port = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(reply.text) for s in f.samples}
    separate = scrape(http_server)
    assert set(on_api_port) == set(separate)
    assert ("nlora_requests_rejected_total", (HTTP, ("reason", "unauthenticated"))) in on_api_port
    assert on_api_port[("nlora_requests_rejected_total", (HTTP, ("reason", "unauthenticated")))] == \
        separate[("nlora_requests_rejected_total", (HTTP, ("reason", "unauthenticated")))]


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_a_request_without_model_says_what_to_name(http_server, path):
    """vLLM runs its base model for a request without 'model'; a newcomer's request here got only
    "model: Field required". The hint names the base model only to a key that may use it."""
    import requests

    body = {"messages": [{"role": "user", "content": "Hi"}]} if path == "/chat/completions" else {"prompt": "Hi"}
    for key, base in ((ADMIN_KEY, f", or {_base(http_server)!r} for the base model"), (TENANT_KEYS["tied-co"], "")):
        resp = requests.post(base_url(http_server) + path, json={**body, "max_tokens": 1}, timeout=60,
                             headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 400
        assert resp.json()["error"] == {
            "message": "model: Field required (vLLM's default of the base model does not apply here); 'model' names "
                       f"an adapter{base} (GET /v1/models lists those this key may use)",
            "type": "invalid_request_error", "param": "model", "code": "invalid_argument"}


def test_a_null_model_says_what_to_name_as_a_missing_one_does(http_server):
    """h141: the openai SDK's ``model=None`` sends ``"model": null``, which got only "model: Input should
    be a valid string, got null", without the hint a request with no 'model' gets."""
    import requests

    resp = requests.post(base_url(http_server) + "/chat/completions", timeout=60,
                         json={"model": None, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "model" and error["code"] == "invalid_argument"
    assert error["message"].startswith("model: Input should be a valid string, got null (vLLM's default of the base "
                                       "model does not apply here); 'model' names an adapter, or "
                                       f"{_base(http_server)!r} for the base model"), error["message"]


@pytest.mark.parametrize("path, body, param, words", [
    ("/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "prompt",
     "'messages' is a chat's field: send chats to POST /v1/chat/completions (this endpoint takes a 'prompt')"),
    ("/chat/completions", {"prompt": "Hi"}, "messages",
     "'prompt' is a completion's field: send raw-text prompts to POST /v1/completions (this endpoint takes "
     "'messages')"),
])
def test_a_body_sent_to_the_other_endpoint_says_where_it_goes(http_server, path, body, param, words):
    """h130: a chat body sent to /v1/completions got "prompt: Field required" and nothing more."""
    import requests

    resp = requests.post(base_url(http_server) + path, json={"model": LORA, **body, "max_tokens": 1}, timeout=60,
                         headers={"Authorization": f"Bearer {TENANT_KEYS['lora-co']}"})
    assert resp.status_code == 400
    assert resp.json()["error"] == {"message": f"{param}: Field required; {words}", "type": "invalid_request_error",
                                    "param": param, "code": "invalid_argument"}



def test_request_log_lines_on_both_front_ends(http_server, tokenizer, caplog):
    """``serve --enable-log-requests --max-log-len 64`` (request_log.py): one line per request on
    each front end whose fields are the response's own (id, usage, adapter version, finish), one per
    refusal naming its reason, a hostile prompt escaped; none while it is off (the server's default).
    Set on this module's running server (the server reads ``metrics.request_log`` per request)."""
    caplog.set_level(logging.INFO, "nlora_serve.requests")
    lora_co = client(http_server, TENANT_KEYS["lora-co"])
    lora_co.completions.create(model=LORA, prompt="Hi", max_tokens=2)  # off: no line
    assert not [r for r in caplog.records if r.name == "nlora_serve.requests"]
    metrics = http_server.server.metrics
    metrics.request_log = RequestLog(64, tokenizer.decode)
    try:
        hostile = "Hi\nINFO forged line\x1b[31m"
        raw = lora_co.completions.with_raw_response.create(model=LORA, prompt=hostile, max_tokens=3, temperature=0)
        answer = raw.parse()
        with NloraClient(http_server.target, api_key=TENANT_KEYS["lora-co"], timeout=60) as grpc_client:
            _, deltas = grpc_client.complete("Hi", adapter=LORA, max_tokens=2, request_id="job-42")
        with NloraClient(http_server.target, api_key=TENANT_KEYS["base-co"], timeout=60) as grpc_client:
            with pytest.raises(PermissionDenied):
                grpc_client.complete("Hi", adapter=LORA, max_tokens=2, request_id="job-43")
        with pytest.raises(openai.PermissionDeniedError):
            client(http_server, TENANT_KEYS["base-co"]).completions.create(model=LORA, prompt="Hi", max_tokens=2)
        chunks = list(lora_co.chat.completions.create(model=LORA, messages=[{"role": "user", "content": "Hi"}],
                                                      max_tokens=2, stream=True,
                                                      stream_options={"include_usage": True}))
        with pytest.raises(openai.AuthenticationError):
            client(http_server, "key-of-nobody").completions.create(model=LORA, prompt="Hi", max_tokens=2)
        assert idle(http_server)  # every stream closed: its line written
    finally:
        metrics.request_log = None
    # every line names the address the request came from (HTTP's request.client, gRPC's context.peer());
    # the client's port is its own, so only its form is checked
    records = [r for r in caplog.records if r.name == "nlora_serve.requests"]
    lines = [re.sub(r" client=127\.0\.0\.1:\d+ ", " client=127.0.0.1:PORT ", r.getMessage()) for r in records]
    # --log-format json: the same lines as objects, each value its own key
    entries = {e.get("request_id"): e for e in (json.loads(JsonFormatter().format(r)) for r in records)}
    assert len(lines) == 6, lines
    # the SSE stream's line is written as its stream closes, which may come after the next request's
    streamed = [line for line in lines if line.startswith(f"request {chunks[0].id!r} ended: ")]
    lines = [line for line in lines if line not in streamed]
    version = raw.headers["x-adapter-version"]
    # each line names the key too: the first 8 hex digits of its sha256, the tenants file's key_sha256
    lora_key, base_key = (hash_key(TENANT_KEYS[name])[:8] for name in ("lora-co", "base-co"))
    assert lines[0].startswith(f"request {answer.id!r} ended: frontend=http client=127.0.0.1:PORT tenant='lora-co' "
                               f"key={lora_key} "
                               f"adapter={LORA!r} "
                               f"v{version} prompt_tokens={answer.usage.prompt_tokens} "
                               f"output_tokens={answer.usage.completion_tokens} ttft_ms=")
    assert "outcome=finished finish_reason='length'" in lines[0]
    # quoted as the log quotes (repr, "=" as \x3d): the model's text may hold "="
    assert f" prompt={quoted(hostile)} output={quoted(answer.choices[0].text)}" in lines[0]
    usage = deltas[-1].usage
    assert lines[1].startswith(f"request 'job-42' ended: frontend=grpc client=127.0.0.1:PORT tenant='lora-co' "
                               f"key={lora_key} "
                               f"adapter={LORA!r} "
                               f"v{deltas[-1].adapter_version} prompt_tokens={usage.prompt_tokens} "
                               f"output_tokens={usage.completion_tokens} ttft_ms=")
    assert lines[2].startswith("request 'job-43' refused: frontend=grpc client=127.0.0.1:PORT tenant='base-co' "
                               f"key={base_key} reason=permission_denied message=")
    assert lines[3].startswith("request refused: frontend=http client=127.0.0.1:PORT tenant='base-co' "
                               f"key={base_key} reason=permission_denied message=")
    chat_usage = chunks[-1].usage
    assert len(streamed) == 1 and streamed[0].startswith(
        f"request {chunks[0].id!r} ended: frontend=http client=127.0.0.1:PORT tenant='lora-co' key={lora_key} "
        f"adapter={LORA!r} v{version} "
        f"prompt_tokens={chat_usage.prompt_tokens} output_tokens={chat_usage.completion_tokens} ttft_ms=")
    assert lines[4] == ("request refused: frontend=http client=127.0.0.1:PORT tenant=- "
                        f"key={hash_key('key-of-nobody')[:8]} reason=unauthenticated "
                        "message='unknown API key'")
    assert all(line.isprintable() for line in lines + streamed)
    whole, grpc_end = entries[answer.id], entries["job-42"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", whole["client"]) and re.fullmatch(r"127\.0\.0\.1:\d+", grpc_end["client"])
    assert (whole["event"], whole["frontend"], whole["tenant"], whole["key_id"], whole["adapter"]) == \
        ("request_ended", "http", "lora-co", lora_key, LORA)
    assert (whole["adapter_version"], whole["prompt_tokens"], whole["output_tokens"], whole["prompt"]) == \
        (int(version), answer.usage.prompt_tokens, answer.usage.completion_tokens, hostile)
    assert (grpc_end["frontend"], grpc_end["output_tokens"]) == ("grpc", usage.completion_tokens)
    assert (entries["job-43"]["event"], entries["job-43"]["reason"]) == ("request_refused", "permission_denied")


def test_a_forwarded_for_that_is_no_ip_address_is_not_the_logged_client(http_server, caplog):
    """The server's own wiring of http_api/forwarded.py (uvicorn's proxy_headers off, ForwardedFor
    in its place): from a loopback peer, X-Forwarded-For is the client only when it is an IP address.
    uvicorn took any text there (``client='tenant='evil''``); tests/test_request_log_forging.py
    covers the wrapper alone, not that the server runs it."""
    caplog.set_level(logging.INFO, "nlora_serve.requests")
    metrics, api = http_server.server.metrics, client(http_server, TENANT_KEYS["lora-co"])
    metrics.request_log = RequestLog()
    try:
        for forwarded in ("tenant='evil' 10.0.0.1", "203.0.113.7"):
            api.completions.create(model=LORA, prompt="Hi", max_tokens=1, extra_headers={"X-Forwarded-For": forwarded})
        assert idle(http_server)
    finally:
        metrics.request_log = None
    lines = [r.getMessage() for r in caplog.records if r.name == "nlora_serve.requests"]
    assert [re.search(r" client=(\S+) ", line).group(1).split(":")[0] for line in lines] == ["127.0.0.1", "203.0.113.7"]
