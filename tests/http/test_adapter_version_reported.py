"""Which adapter version answered: a tied tenant's N hot-swapped between two requests and during
two streams (one per front end). Every HTTP response says the version it ran on in its
``X-Adapter-Version`` / ``X-Adapter-Hash`` headers and in OpenAI's ``system_fingerprint`` on every
object; every gRPC delta in its ``AdapterRef``. The reference is what the admin RPCs acknowledged:
the upload's version and hash, then the swap's."""

from __future__ import annotations

import safetensors.torch

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from http_harness import CASES, client
from nlora_serve.client import NloraClient

TIED = "inttune-nystrom-tied"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
STREAM_TOKENS = 120  # long enough to be running still when the swap is acknowledged


def _fingerprint(version: int, content_hash: str) -> str:
    return f"{TIED}:v{version}:{content_hash[:12]}"


def _whole(server, chat: bool) -> tuple[dict, dict]:
    api = client(server, TENANT_KEYS["tied-co"])
    if chat:
        raw = api.chat.completions.with_raw_response.create(model=TIED, messages=MESSAGES, max_tokens=3)
    else:
        raw = api.completions.with_raw_response.create(model=TIED, prompt="Colours:", max_tokens=3)
    return raw.parse().model_dump(), dict(raw.headers)  # header names lower-cased


def _assert_whole_on(server, version: int, content_hash: str) -> None:
    for chat in (False, True):
        body, headers = _whole(server, chat)
        assert headers["x-adapter-version"] == str(version)
        assert headers["x-adapter-hash"] == content_hash
        assert body["system_fingerprint"] == _fingerprint(version, content_hash)
    with NloraClient(server.target, api_key=TENANT_KEYS["tied-co"], timeout=60) as grpc_client:
        _, deltas = grpc_client.complete("Colours:", adapter=TIED, max_tokens=3)
    assert {(d.adapter, d.adapter_version, d.content_hash) for d in deltas} == {(TIED, version, content_hash)}


def _n_scaled(server, factor: float) -> bytes:
    stored = server.engine.adapters.registry.get(TIED).path / "adapter_model.safetensors"
    n = safetensors.torch.load_file(stored)
    return safetensors.torch.save({k: (t * factor).contiguous() for k, t in n.items()})


def test_a_swap_between_requests_and_during_streams_reports_each_version(make_http_server):
    server = make_http_server()
    with NloraClient(server.target, api_key=ADMIN_KEY, timeout=60) as admin:
        first = admin.upload_adapter(TIED, CASES / TIED)
        _assert_whole_on(server, first.version, first.content_hash)

        http_stream = client(server, TENANT_KEYS["tied-co"]).chat.completions.with_streaming_response.create(
            model=TIED, messages=MESSAGES, max_tokens=STREAM_TOKENS, stream=True, extra_body={"ignore_eos": True})
        grpc_client = NloraClient(server.target, api_key=TENANT_KEYS["tied-co"], timeout=120)
        with http_stream as response, grpc_client:
            events = iter(response.parse())
            chunks = [next(events)]
            grpc_deltas = grpc_client.generate("Colours:", adapter=TIED, max_tokens=STREAM_TOKENS, ignore_eos=True)
            deltas = [next(grpc_deltas)]

            second = admin.swap_adapter(TIED, _n_scaled(server, 1.5))
            assert (second.version, second.content_hash != first.content_hash) == (first.version + 1, True)
            # both streams still hold the first version: the swap happened while they ran
            assert server.engine.adapters.registry.holders(TIED) == 2

            chunks += list(events)
            deltas += list(grpc_deltas)
            assert response.headers["x-adapter-version"] == str(first.version)
            assert response.headers["x-adapter-hash"] == first.content_hash
        assert chunks[-1].choices[0].finish_reason == "length"
        assert {c.system_fingerprint for c in chunks} == {_fingerprint(first.version, first.content_hash)}
        assert deltas[-1].finish_reason == "length"
        assert {(d.adapter_version, d.content_hash) for d in deltas} == {(first.version, first.content_hash)}

        _assert_whole_on(server, second.version, second.content_hash)


def test_the_base_model_reports_version_zero_and_no_fingerprint(make_http_server):
    server = make_http_server()
    api = client(server, TENANT_KEYS["base-co"])
    base_model = api.models.list().data[0].id  # the base model comes first
    raw = api.completions.with_raw_response.create(model=base_model, prompt="Colours:", max_tokens=2)
    assert raw.headers["x-adapter-version"] == "0"
    assert "x-adapter-hash" not in raw.headers
    assert raw.parse().system_fingerprint is None
