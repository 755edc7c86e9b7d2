"""Tenants see only their adapters: every answer a tenant key gets for an adapter that exists but is
not granted to it is the answer for one that does not exist, byte for byte but for the name (status,
body, headers), on every route that takes a name, over HTTP and gRPC; listings hold only its own."""

from __future__ import annotations

import time

import pytest
import requests

from grpc_harness import TENANT_KEYS
from http_harness import TENANTS
from nlora_serve.client import NloraClient
from nlora_serve.client.types import NloraClientError

OTHERS = "inttune-nystrom-tied"  # registered, granted to tied-co only
NOBODYS = "inttune-nowhere-at-all"  # registered by nobody
CALLER = "lora-co"  # granted lora-rslora and the base model
SAME_HEADERS = ("content-type", "www-authenticate", "x-adapter-version", "x-adapter-hash")


def _routes() -> list[tuple[str, str, object]]:
    """(method, path, JSON body) of each route that takes a model or adapter name, the name as NAME."""
    return [("POST", "/v1/completions", {"model": "NAME", "prompt": "Hi", "max_tokens": 1}),
            ("POST", "/v1/chat/completions", {"model": "NAME", "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": 1}),
            ("POST", "/v1/completions", {"model": "NAME", "prompt": "Hi", "max_tokens": 1, "n": 2, "stream": True}),
            ("GET", "/v1/models/NAME", None),
            ("POST", "/tokenize", {"model": "NAME", "prompt": "Hi"}),
            ("POST", "/tokenize", {"model": "NAME", "messages": [{"role": "user", "content": "Hi"}]}),
            ("POST", "/detokenize", {"model": "NAME", "tokens": [1, 2]}),
            ("POST", "/v1/load_lora_adapter", {"lora_name": "NAME", "lora_path": "/nowhere"}),
            ("POST", "/v1/unload_lora_adapter", {"lora_name": "NAME"})]


def _ask(server, method: str, path: str, body, name: str) -> tuple[int, str, dict]:
    """(status, body with ``name`` written NAME, the headers that could tell the two apart)."""
    fill = (lambda value: value.replace("NAME", name) if isinstance(value, str) else value)
    url = f"http://127.0.0.1:{server.server.http_port}{fill(path)}"
    json_body = {key: fill(value) for key, value in body.items()} if body is not None else None
    answer = requests.request(method, url, json=json_body, timeout=60,
                           headers={"Authorization": f"Bearer {TENANT_KEYS[CALLER]}"})
    headers = {key: answer.headers.get(key) for key in SAME_HEADERS}
    return answer.status_code, answer.text.replace(name, "NAME"), headers


@pytest.mark.parametrize("runtime_updating", [False, True], ids=["lora-admin-off", "lora-admin-on"])
def test_another_tenants_adapter_answers_as_one_that_does_not_exist_on_every_route(make_http_server,
                                                                                    runtime_updating):
    from http_harness import CASES

    server = make_http_server(allow_runtime_lora_updating=runtime_updating)
    for adapter in TENANTS:
        server.engine.adapters.register_dir(adapter, CASES / adapter)
    assert OTHERS in {v.name for v in server.engine.adapters.versions()}
    for method, path, body in _routes():
        others, nobodys = _ask(server, method, path, body, OTHERS), _ask(server, method, path, body, NOBODYS)
        assert others == nobodys, (method, path, body)
        assert others[0] in (403, 404), (method, path, others)  # refused, never served
        assert "tied-co" not in others[1]
    with NloraClient(server.target, api_key=TENANT_KEYS[CALLER]) as client:
        for call in (lambda name: client.complete("Hi", adapter=name, max_tokens=1), client.load_adapter,
                     client.unload_adapter):
            refusals = []
            for name in (OTHERS, NOBODYS):
                with pytest.raises(NloraClientError) as err:
                    call(name)
                refusals.append((err.value.code, str(err.value).replace(name, "NAME")))
            assert refusals[0] == refusals[1] and "tied-co" not in refusals[0][1]
        listed, base_allowed = client.list_adapters()
        assert [a.name for a in listed] == ["lora-rslora"] and base_allowed
    models = requests.get(f"http://127.0.0.1:{server.server.http_port}/v1/models", timeout=60,
                       headers={"Authorization": f"Bearer {TENANT_KEYS[CALLER]}"}).json()
    assert sorted(m["id"] for m in models["data"]) == sorted([server.server.generation.info.model, "lora-rslora"])


def test_list_adapters_counts_the_callers_own_requests_on_an_adapter_it_shares(base_fp32, tokenizer, tmp_path):
    """An adapter granted to two tenants runs both's requests: ListAdapters told each tenant the
    other's count (active_requests was every tenant's); now each reads its own, the admin the sum."""
    import json

    from grpc_harness import ADMIN_KEY, server_factory, stop_all
    from http_harness import CASES
    from nlora_serve.serving.auth import hash_key

    keys = {"ann": "key-of-ann", "ben": "key-of-ben"}
    doc = {"admin_keys": [{"name": "ops", "key_sha256": hash_key(ADMIN_KEY)}],
           "tenants": [{"name": name, "key_sha256": hash_key(key), "adapters": ["lora-rslora"]}
                       for name, key in keys.items()]}
    (tmp_path / "tenants.json").write_text(json.dumps(doc))
    make, running = server_factory(base_fp32, tokenizer, tmp_path)
    try:
        server = make(tmp_path / "tenants.json")
        server.engine.adapters.register_dir("lora-rslora", CASES / "lora-rslora")
        clients = {who: NloraClient(server.target, api_key=key) for who, key in {**keys, "ops": ADMIN_KEY}.items()}

        def counts() -> dict[str, int]:
            return {who: [a.active_requests for a in c.list_adapters()[0] if a.name == "lora-rslora"][0]
                    for who, c in clients.items()}

        long = dict(adapter="lora-rslora", max_tokens=200, ignore_eos=True, temperature=0.0)
        assert counts() == {"ann": 0, "ben": 0, "ops": 0}
        ben = [clients["ben"].generate("Once upon a time", **long) for _ in range(2)]
        for stream in ben:
            next(stream)  # admitted and running
        assert counts() == {"ann": 0, "ben": 2, "ops": 2}
        ann = clients["ann"].generate("Once upon a time", **long)
        next(ann)
        assert counts() == {"ann": 1, "ben": 2, "ops": 3}
        for stream in (*ben, ann):
            stream.close()
        for client in clients.values():
            client.close()
    finally:
        stop_all(running)


def test_a_tenant_waiting_for_a_lora_slot_reads_nothing_of_the_tenant_holding_it(base_fp32, tokenizer, tmp_path,
                                                                                 caplog):
    """--max-loras 1, ben's request holds the slot: ann's requests on her own adapter, over HTTP and
    gRPC, wait (counted in nlora_requests_waiting) and answer her adapter's greedy reference once
    ben's ends. They were refused (429 pool_full, RESOURCE_EXHAUSTED) at once, as vLLM does not:
    it queues them. Nothing she reads names ben; the server's log names the slot count for the
    operator, once."""
    import json
    import logging
    import threading

    from grpc_harness import RunningServer, matches_reference
    from http_harness import CASES, references, scrape
    from nlora_serve.adapters.runtime.manager import AdapterLimits
    from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.serving.auth import Authenticator, hash_key
    from nlora_serve.serving.grpc_api.convert import server_info
    from nlora_serve.serving.server_config import ServerConfig

    keys = {"ann": "key-of-ann", "ben": "key-of-ben"}
    doc = {"tenants": [{"name": name, "key_sha256": hash_key(key), "adapters": [f"{name}-*"]}
                       for name, key in keys.items()]}
    (tmp_path / "tenants.json").write_text(json.dumps(doc))
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024),
                          cache=CacheConfig(num_blocks=256), adapter_dir=str(tmp_path / "store"),
                          adapter_limits=AdapterLimits(max_loras=1))
    engine = LLMEngine(config, base_fp32)
    serve = ServerConfig(port=0, http_port=0, metrics_port=0, tenants_file=str(tmp_path / "tenants.json"))
    server = RunningServer(engine, serve, Authenticator.from_file(tmp_path / "tenants.json"),
                           server_info(base_fp32, config, serve), tokenizer)
    caplog.set_level(logging.INFO, logger="nlora_serve.adapters.runtime.residency")
    ref = references("lora-layers-subset")[0]
    n = len(ref["greedy_token_ids"])
    answers = {}

    def over_http():
        answers["http"] = requests.post(f"http://127.0.0.1:{server.server.http_port}/v1/completions", timeout=120,
                                        headers={"Authorization": f"Bearer {keys['ann']}"},
                                        json={"model": "ann-lora", "prompt": ref["prompt_token_ids"], "max_tokens": n,
                                              "min_tokens": n, "temperature": 0, "logprobs": 0,
                                              "return_tokens_as_token_ids": True})

    def over_grpc():
        answers["grpc"] = ann.complete(ref["prompt_token_ids"], adapter="ann-lora", max_tokens=n, min_tokens=n,
                                       temperature=0.0)

    try:
        engine.adapters.register_dir("ben-lora", CASES / "lora-rslora")
        engine.adapters.register_dir("ann-lora", CASES / "lora-layers-subset")  # evicts nothing held: ben's is idle
        with NloraClient(server.target, api_key=keys["ben"]) as ben, \
                NloraClient(server.target, api_key=keys["ann"]) as ann:
            held = ben.generate("Once upon a time", adapter="ben-lora", max_tokens=900, ignore_eos=True)
            next(held)  # ben's request runs on the one slot
            threads = [threading.Thread(target=over_http), threading.Thread(target=over_grpc)]
            for thread in threads:
                thread.start()
            waited = time.monotonic() + 60
            while engine.stats()["waiting"] < 2:
                assert time.monotonic() < waited, "ann's requests never queued"
                time.sleep(0.01)
            time.sleep(0.3)  # ben's steps run meanwhile; ann's still wait
            assert not answers and scrape(server)[("nlora_requests_waiting", ())] == 2
            held.close()
            for thread in threads:
                thread.join(120)
        assert answers["http"].status_code == 200, answers["http"].text
        http_tokens = [int(t.removeprefix("token_id:")) for t in answers["http"].json()["choices"][0]["logprobs"]["tokens"]]
        grpc_tokens = [t for d in answers["grpc"][1] for t in d.token_ids]
        for tokens in (http_tokens, grpc_tokens):
            assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"])
        assert "ben" not in answers["http"].text and "ben" not in answers["grpc"][0]
        # one line for her two waits (RefusalLog: one per tenant and kind every 10 s)
        assert caplog.text.count("LoRA slot not free for tenant 'ann' for adapter ann-lora v1 (its request "
                                 "waits): all 1 slots (--max-loras) are held by running requests") == 1
        samples = scrape(server)
        assert not any(name == "nlora_requests_rejected_total" and ("reason", "pool_full") in labels and value
                       for (name, labels), value in samples.items())
        assert engine.stats()["waiting"] == 0 and engine.stats()["running"] == 0
    finally:
        server.stop()
        engine.shutdown()
