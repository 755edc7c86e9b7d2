"""vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter on our HTTP port: off unless the
server allows them, admin keys only, an adapter loaded from a server folder then answering its
case's recorded transformers references (fp32), written to the store, and every refusal named."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from grpc_harness import ADMIN_KEY, TENANT_KEYS, RunningServer, matches_reference
from http_harness import CASES, client, references
from nlora_serve.client import FailedPrecondition, NloraClient
from nlora_serve.log_format import JsonFormatter
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.serving.commands import serve as serve_cli
from nlora_serve.serving.commands import serve_build
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server_config import ServerConfig

CASE = "inttune-nystrom-tied"  # tests/data/cases: a tied IntTune tenant with recorded references
NAME = "inttune-loaded"  # granted to tied-co by its pattern "inttune-*" (grpc_harness.GRANTS)
LOADED = f"Success: LoRA adapter '{NAME}' added successfully."


def _post(server, path: str, body: dict, key: str | None = ADMIN_KEY) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return requests.post(f"http://127.0.0.1:{server.server.http_port}{path}", data=json.dumps(body), timeout=60,
                         headers={"Content-Type": "application/json", **headers})


def _load(server, path=CASES / CASE, name: str = NAME, key: str | None = ADMIN_KEY, **fields) -> requests.Response:
    return _post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), **fields}, key)


def _refused(resp: requests.Response, status: int, message: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (error["message"], error["param"]) == (message, param), error


def _served(server) -> dict[str, int]:
    return {v.name: v.version for v in server.engine.adapters.versions()}


def _greedy(server, model: str, ref: dict) -> list[int]:
    n = len(ref["greedy_token_ids"])
    answer = client(server, TENANT_KEYS["tied-co"]).completions.create(
        model=model, prompt=ref["prompt_token_ids"], max_tokens=n, temperature=0, logprobs=0,
        extra_body={"min_tokens": n, "return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in answer.choices[0].logprobs.tokens]


@pytest.fixture
def server(make_http_server):
    return make_http_server(allow_runtime_lora_updating=True)


def test_off_by_default_the_routes_answer_404_naming_the_flag(make_http_server):
    server = make_http_server()
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        _refused(_post(server, path, {"lora_name": NAME, "lora_path": str(CASES / CASE)}), 404,
                 f"{path} is off on this server: start it with --allow-runtime-lora-updating (or "
                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true) to load adapters from its disk over HTTP, or use "
                 "`nlora-serve adapters upload` / `unload` (gRPC)")
    assert _served(server) == {}


def test_a_loaded_adapter_answers_its_references_and_is_stored(server):
    assert _load(server, key=None).status_code == 401
    _refused(_load(server, key=TENANT_KEYS["tied-co"]), 403,
             "/v1/load_lora_adapter needs an admin key; 'tied-co' is a tenant key")
    assert _served(server) == {}
    resp = _load(server)
    assert (resp.status_code, resp.text) == (200, LOADED)
    assert _served(server) == {NAME: 1}
    assert server.engine.adapters.registry.store.latest(NAME).version == 1  # durable, as an upload
    for ref in references(CASE):
        assert matches_reference(_greedy(server, NAME, ref), ref["greedy_token_ids"], ref["top2_logit_margins"])
    models = client(server, TENANT_KEYS["tied-co"]).models.list()
    assert NAME in [m.id for m in models.data]


def test_a_served_name_loads_again_only_in_place_as_its_next_version(server):
    assert _load(server).status_code == 200
    _refused(_load(server), 400, f"the lora adapter {NAME!r} has already been loaded; to load a new version in "
                                 "place, set 'load_inplace' to true", "lora_name")
    resp = _load(server, load_inplace=True)  # the same files: the same version, nothing written (s30)
    assert (resp.status_code, resp.text) == (200, LOADED)
    assert _served(server) == {NAME: 1}
    resp = _load(server, CASES / "lora-rslora", load_inplace=True)
    assert (resp.status_code, resp.text) == (200, LOADED)
    assert _served(server) == {NAME: 2}



def test_a_live_rollback_loads_a_kept_store_folder_in_place_as_the_next_version(server):
    # serve --keep-versions 3 (set on the running registry: the fixture's server keeps 1)
    registry = server.engine.adapters.registry
    registry.keep_versions = 3
    assert _load(server).status_code == 200
    first = registry.get(NAME).content_hash
    assert _load(server, CASES / "lora-rslora", load_inplace=True).status_code == 200  # an upgrade, v2
    assert registry.get(NAME).content_hash != first
    kept = registry.store.root / NAME / "00000001"  # what `adapters versions` lists; read on the server's disk
    resp = _load(server, kept, load_inplace=True)
    assert (resp.status_code, resp.text) == (200, LOADED)
    assert _served(server) == {NAME: 3} and registry.get(NAME).content_hash == first  # v1's maths, as v3
    registry.store.wait_deleted()
    assert registry.store.versions(NAME) == [1, 2, 3]


def test_unload_stops_serving_the_name_and_an_unknown_name_is_404(server, caplog):
    caplog.set_level(logging.INFO, logger="nlora_serve.serving.http_api.lora_admin")
    assert _load(server).status_code == 200
    # one request running on it: vLLM's body, the count that drains in a header (gRPC's draining_requests)
    running = client(server, TENANT_KEYS["tied-co"]).completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=500, stream=True, extra_body={"ignore_eos": True})
    next(iter(running))
    with ThreadPoolExecutor(1) as pool:
        with server.engine.adapters.registry._write_lock:  # an upload's or swap's durable write under way
            unloading = pool.submit(_post, server, "/v1/unload_lora_adapter", {"lora_name": NAME, "lora_int_id": 7})
            time.sleep(0.2)
            start = time.perf_counter()  # the unload waits for the lock in a thread, not on the event loop
            health = requests.get(f"http://127.0.0.1:{server.server.http_port}/health", timeout=2)
            assert (health.status_code, unloading.done()) == (200, False) and time.perf_counter() - start < 0.5
        resp = unloading.result()
    running.close()
    assert (resp.status_code, resp.text) == (200, f"Success: LoRA adapter '{NAME}' removed successfully.")
    assert resp.headers["X-Draining-Requests"] == "1"
    said = [re.sub(r"\(\d+ ms\)$", "(N ms)", re.sub(r" from 127\.0\.0\.1:\d+:", " from 127.0.0.1:PORT:",
                                                     r.getMessage())) for r in caplog.records]
    # who changed what from where, as gRPC's admin RPCs log it (and as the request log names a client)
    assert said == [f"/v1/load_lora_adapter by 'ops' from 127.0.0.1:PORT: adapter '{NAME}' v1 serving (inttune-tied, "
                    f"rank 8) from {str(CASES / CASE)!r} (N ms)",
                    f"/v1/unload_lora_adapter by 'ops' from 127.0.0.1:PORT: adapter '{NAME}' v1 unloaded (1 requests "
                    "draining)"]
    entries = [json.loads(JsonFormatter().format(r)) for r in caplog.records]  # serve --log-format json
    assert [(e["event"], re.sub(r":\d+$", ":PORT", e["client"])) for e in entries] == [("admin_done", "127.0.0.1:PORT")] * 2
    assert _served(server) == {}
    again = _post(server, "/v1/unload_lora_adapter", {"lora_name": NAME})
    assert again.status_code == 404 and "'model' names" not in again.json()["error"]["message"], again.text
    _refused(_post(server, "/v1/unload_lora_adapter", {"lora_name": NAME}, TENANT_KEYS["lora-co"]), 403,
             "/v1/unload_lora_adapter needs an admin key; 'lora-co' is a tenant key")
    # refusals of a known key are logged naming it (h99) and the address it came from (request.client),
    # as gRPC's AdapterAdmin logs them
    assert [re.sub(r" from 127\.0\.0\.1:\d+ ", " from 127.0.0.1:PORT ", r.getMessage())
            for r in caplog.records][len(said):] == [
        f"/v1/unload_lora_adapter by 'ops' from 127.0.0.1:PORT refused (404): {again.json()['error']['message']}",
        "/v1/unload_lora_adapter by tenant 'lora-co' from 127.0.0.1:PORT refused (403): /v1/unload_lora_adapter "
        "needs an admin key; 'lora-co' is a tenant key"]


def test_bad_loads_are_refused_by_name_and_serve_nothing(server, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = server.server.generation.info.model
    _refused(_load(server, tmp_path / "nowhere"), 404, f"lora_path {str(tmp_path / 'nowhere')!r}: no such folder "
                                                       "on the server")
    resp = _load(server, empty)
    assert resp.status_code == 400 and "adapter_config.json" in resp.json()["error"]["message"], resp.text
    assert _load(server, name="../escape").status_code == 400
    _refused(_load(server, name=base), 400,
             f"adapter name {base!r} is the served base model name (--served-model-name): an HTTP request for "
             f"model {base!r} runs the base model, so this adapter could never be reached; register it under "
             "another name or serve the base model under another --served-model-name")
    _refused(_load(server, is_3d_lora_weight=True), 400, "is_3d_lora_weight=true is not supported: this server "
                                                         "serves 2-D LoRA weights only", "is_3d_lora_weight")
    _refused(_load(server, base_model_name="x"), 400, "unsupported field 'base_model_name': this server does not "
                                                      "implement it (at any value, null and [] included); remove it",
             "base_model_name")
    resp = _post(server, "/v1/load_lora_adapter", {"lora_name": NAME})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "lora_path", resp.text
    assert _served(server) == {} and server.engine.adapters.registry.store.latest(NAME) is None
    assert _load(server).status_code == 200  # and the server still loads a good one


def test_a_folder_over_max_adapter_bytes_is_refused_before_reading(make_http_server, tmp_path):
    folder = shutil.copytree(CASES / CASE, tmp_path / "copy")
    total = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("adapter_"))
    server = make_http_server(allow_runtime_lora_updating=True, max_adapter_bytes=total - 1)
    _refused(_load(server, folder), 413, f"lora_path {str(folder)!r}: adapter_config.json + "
                                         f"adapter_model.safetensors are {total} bytes, over the server's "
                                         f"--max-adapter-bytes {total - 1}")
    assert _served(server) == {}


@pytest.mark.parametrize("env, flags, on", [(None, [], False), ("true", [], True), ("1", [], True),
                                            ("TRUE", ["--no-allow-runtime-lora-updating"], False),
                                            ("0", [], False), (None, ["--allow-runtime-lora-updating"], True)])
def test_the_flag_defaults_to_vllms_environment_variable(monkeypatch, env, flags, on):
    if env is None:
        monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", env)
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    args = parser.parse_args(flags)
    assert args.allow_runtime_lora_updating is on
    config, _ = serve_build._configs(args)
    assert config.allow_runtime_lora_updating is on


def test_a_server_without_an_adapter_store_says_so_on_both_admin_surfaces(base_fp32, tokenizer):
    engine_config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256,
                                                           max_model_len=512), cache=CacheConfig(num_blocks=32))
    engine = LLMEngine(engine_config, base_fp32)  # no adapter_dir: no store
    config = ServerConfig(port=0, http_port=0, allow_runtime_lora_updating=True)
    running = RunningServer(engine, config, Authenticator(None), server_info(base_fp32, engine_config, config),
                            tokenizer)
    message = "this server has no adapter store (start it with --adapter-dir)"
    try:
        loaded = _load(running, key=None)
        _refused(loaded, 404, message)
        _refused(_post(running, "/v1/unload_lora_adapter", {"lora_name": NAME}, key=None), 404, message)
        with NloraClient(running.target) as grpc_client, pytest.raises(FailedPrecondition) as err:
            grpc_client.unload_adapter(NAME)
        assert str(err.value) == f"FAILED_PRECONDITION: {message}"
        assert err.value.reason == loaded.json()["error"]["code"] == "not_found"  # nlora-reason: HTTP's code
    finally:
        running.stop()
        engine.shutdown()
