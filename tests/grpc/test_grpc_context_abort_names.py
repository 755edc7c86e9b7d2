"""What a vLLM user expects over gRPC: prompt + max_tokens over max_model_len is refused at
admission in vLLM's words (an unset max_tokens is the rest of the context); a forced unload ends
the streams it aborts with ABORTED naming the adapter version, other tenants' streams untouched;
an adapter may not take the served base model's name."""

from __future__ import annotations

import argparse

import grpc
import pytest

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from nlora_serve.adapters.store import ALLOWED_FILES, AdapterStore
from nlora_serve.client import Aborted, InvalidArgument, NloraClient
from nlora_serve.errors import AdapterError
from nlora_serve.serving.commands import serve as serve_cli
from nlora_serve.serving.commands import serve_build
from nlora_serve.serving.auth import Authenticator
from nlora_serve.engine.config import CacheConfig, EngineConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server import NloraServer
from nlora_serve.serving.server_config import ServerConfig
from serving_check import CASES, TIED, still_serves

MAX_MODEL_LEN = 1024  # grpc_harness.server_factory's engines
SERVED = "SmolLM2-135M-Instruct.Q4_1"  # the default model's served name


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    return parser.parse_args(list(flags))


def _prompt(n: int) -> list[int]:
    return [1] + [30] * (n - 1)


@pytest.fixture(scope="module")
def server(make_module_server):
    return make_module_server()


@pytest.fixture
def no_model(monkeypatch):
    """The names must be refused before the model loads: loading it fails the test."""
    def load_base(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter names were checked")
    monkeypatch.setattr(serve_build, "load_base", load_base)


PROMPT_FILLS_IT = ("This model's maximum context length is 1024 tokens. However, you requested 1024 tokens in the "
                   "messages. Please reduce the length of the messages.")


@pytest.mark.parametrize("prompt_len, max_tokens", [(1024, 0), (1024, 100)])  # 0: unset
def test_a_prompt_that_leaves_no_room_is_refused_at_admission(server, prompt_len, max_tokens):
    with NloraClient(server.target) as client, pytest.raises(InvalidArgument) as err:
        list(client.generate(_prompt(prompt_len), max_tokens=max_tokens))
    assert str(err.value) == f"INVALID_ARGUMENT: {PROMPT_FILLS_IT}"
    stats = server.engine.stats()
    assert stats["kv_blocks_used"] == stats["running"] == stats["waiting"] == server.server.admission.inflight == 0
    still_serves(server.target, adapter=None)


def test_unset_or_too_large_max_tokens_is_the_rest_of_the_context(server):
    """max_tokens unset, or over the room the prompt leaves (1000 + 100 > 1024: lowered to 24, as
    vLLM 0.32's get_max_tokens), both run to the context's end, the same greedy tokens."""
    with NloraClient(server.target) as client:
        unset = list(client.generate(_prompt(1000), ignore_eos=True, temperature=0.0))
        over = list(client.generate(_prompt(1000), max_tokens=100, ignore_eos=True, temperature=0.0))
    for deltas in (unset, over):
        assert deltas[-1].finish_reason == "length"
        assert deltas[-1].usage.completion_tokens == MAX_MODEL_LEN - 1000
    tokens = [[t for d in deltas for t in d.token_ids] for deltas in (unset, over)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == MAX_MODEL_LEN - 1000


def test_a_forced_unload_ends_its_streams_with_aborted_naming_the_version(make_server, tenants_file):
    server = make_server(tenants_file)
    with (NloraClient(server.target, api_key=ADMIN_KEY) as admin,
          NloraClient(server.target, api_key=TENANT_KEYS["tied-co"]) as tied,
          NloraClient(server.target, api_key=TENANT_KEYS["base-co"]) as base):
        admin.upload_adapter(TIED, CASES / TIED)
        version = server.engine.adapters.registry.get(TIED)
        victim = tied.generate(_prompt(8), adapter=TIED, max_tokens=400, ignore_eos=True)
        other = base.generate(_prompt(8), max_tokens=40, min_tokens=40)
        next(victim), next(other)  # both running
        assert admin.unload_adapter(TIED, force=True).aborted_requests == 1
        with pytest.raises(Aborted) as err:  # the README: failures raise classes named after their status
            list(victim)
        rest = list(other)  # the base-model tenant's stream runs on to its end
    assert err.value.code == grpc.StatusCode.ABORTED
    assert str(err.value) == (f"ABORTED: adapter '{TIED}' v{version.version} was unloaded by an operator "
                              "(UnloadAdapter force=true) while this request ran; the request was aborted")
    assert rest[-1].finish_reason == "length" and rest[-1].usage.completion_tokens == 40
    assert version.refcount == 0 and server.engine.stats()["kv_blocks_used"] == 0


def test_an_engine_adapter_named_like_the_served_model_is_refused_at_startup(base_fp32, tokenizer, tmp_path):
    engine = LLMEngine(EngineConfig(adapter_dir=str(tmp_path / "store"), cache=CacheConfig(num_blocks=160)), base_fp32)
    try:
        engine.adapters.register_dir(SERVED, CASES / TIED)
        config = ServerConfig(port=0)
        with pytest.raises(AdapterError) as err:
            NloraServer(engine, config, Authenticator(None), server_info(base_fp32, engine.core.config, config),
                        tokenizer)
        assert f"adapter name '{SERVED}' is the served base model name (--served-model-name)" in str(err.value)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("flags, stored", [
    (["--served-model-name", "upper", "--adapter", f"upper={CASES / TIED}"], None),
    (["--adapter", f"{SERVED}={CASES / TIED}"], None),
    ([], SERVED),  # a stored tenant from an earlier run
    (["--served-model-name", "tenant-001", "--example-tenants", "2"], None),
])
def test_serve_refuses_adapter_names_equal_to_the_served_name_before_loading(tmp_path, no_model, flags, stored):
    if stored is not None:
        AdapterStore(tmp_path / "store").write(stored, {f: (CASES / TIED / f).read_bytes() for f in ALLOWED_FILES})
    with pytest.raises(AdapterError, match="is the served base model name") as err:
        serve_cli.build(_args("--port", "0", "--http-port", "0", "--adapter-dir", str(tmp_path / "store"), *flags))
    assert "another --served-model-name" in str(err.value)


def test_uploading_an_adapter_under_the_served_name_is_invalid_argument(server):
    with NloraClient(server.target) as admin, pytest.raises(InvalidArgument, match="served base model name"):
        admin.upload_adapter(SERVED, CASES / TIED)
    assert SERVED not in {v.name for v in server.engine.adapters.versions()}
