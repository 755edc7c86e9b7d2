"""Re-reading the tenants file while serving (SIGHUP; serving/tenants_reload.py): on a real server
with both front ends, a revoked key is refused on its next call while its running streams finish,
a new tenant gets exactly its grants, quotas and weights change admission and the engine, a file
the loader refuses changes nothing; and ``serve`` reloads on a real SIGHUP."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from grpc_harness import ADMIN_KEY, GRANTS, TENANT_KEYS, RunningServer, server_factory, stop_all
from http_harness import CASES, TENANTS, client
from nlora_serve.client import NloraClient, PermissionDenied, ResourceExhausted, Unauthenticated
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.serving.auth import Authenticator, hash_key
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server_config import ServerConfig

ROOT = Path(__file__).parents[2]
PROMPT = [1, 9690, 198, 2683]
NEW_KEY = "key-of-new-co"
LONG = 48  # tokens of a stream that must still run when the test reloads (its steps are held meanwhile)


def _entries(**changes) -> list[dict]:
    """The harness's tenant entries (grpc_harness.write_tenants_file), each updated by ``changes[name]``
    (a dict of fields; None drops the tenant)."""
    entries = []
    for name, (adapters, base) in GRANTS.items():
        entry = {"name": name, "key_sha256": hash_key(TENANT_KEYS[name]), "adapters": adapters, "base_model": base}
        if changes.get(name, {}) is not None:
            entries.append({**entry, **changes.get(name, {})})
    return entries


def _write(path: Path, tenants: list[dict]) -> None:
    path.write_text(json.dumps({"admin_keys": [{"name": "ops", "key_sha256": hash_key(ADMIN_KEY)}],
                                "tenants": tenants}))


def _reload(server) -> bool:
    """The server's SIGHUP handler, on its event loop (as loop.add_signal_handler runs it)."""
    async def on_loop() -> bool:
        return server.server.reload_tenants()
    return server.call(on_loop())


def _tenants_file(server) -> Path:
    return Path(server.server.config.tenants_file)


@pytest.fixture
def server(make_http_server):
    server = make_http_server(metrics_port=0)
    for name in TENANTS:
        server.engine.adapters.register_dir(name, CASES / name)
    return server


@pytest.fixture
def hold_steps(monkeypatch):
    """hold_steps(server) -> an Event, set: the server's engine steps only while it is set. A test
    clears it once its streams run and the file is reloaded, so that they still run while it checks
    the refusals (none of which needs a step) whatever the load, and sets it to let them finish;
    set again at teardown, so that a failed test's server can stop."""
    events = []

    def hold(server) -> threading.Event:
        stepping, step = threading.Event(), server.engine.core.step
        stepping.set()
        monkeypatch.setattr(server.engine.core, "step", lambda: stepping.wait(60) and step())
        events.append(stepping)
        return stepping
    yield hold
    for stepping in events:
        stepping.set()


def _grpc_generate(server, key: str, adapter: str | None = None):
    with NloraClient(server.target, api_key=key, timeout=60) as grpc_client:
        return grpc_client.complete(PROMPT, adapter=adapter, max_tokens=2)[1]


def test_a_revoked_key_is_refused_on_both_front_ends_while_its_running_streams_finish(server, hold_steps, caplog):
    base = server.server.generation.info.model
    key = TENANT_KEYS["base-co"]
    stepping = hold_steps(server)
    http_stream = iter(client(server, key).completions.create(
        model=base, prompt="Once upon a time", max_tokens=LONG, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"min_tokens": LONG}))
    http_got = [next(http_stream)]  # admitted and running
    with NloraClient(server.target, api_key=key, timeout=60) as grpc_client:
        grpc_stream = grpc_client.generate(PROMPT, max_tokens=LONG, min_tokens=LONG)
        grpc_got = [next(grpc_stream)]
        _write(_tenants_file(server), _entries(**{"base-co": None}))
        with caplog.at_level(logging.INFO, logger="nlora_serve.tenants"):
            assert _reload(server) is True  # between the streams' steps
        stepping.clear()  # at most the step under way ends now: both streams run on until set again
        with pytest.raises(openai.AuthenticationError) as refused:
            client(server, key).completions.create(model=base, prompt="Hi", max_tokens=2)
        assert refused.value.status_code == 401 and "unknown API key" in str(refused.value)
        with pytest.raises(Unauthenticated, match="unknown API key"):
            _grpc_generate(server, key)
        with pytest.raises(Unauthenticated):
            grpc_client.list_adapters()
        assert server.server.admission.held == {"base-co": 2}  # both streams ran through the refusals
        stepping.set()
        grpc_got += list(grpc_stream)
    http_got += list(http_stream)
    assert http_got[-2].choices[0].finish_reason == "length" and http_got[-1].usage.completion_tokens == LONG
    assert grpc_got[-1].finish_reason == "length" and sum(len(d.token_ids) for d in grpc_got) == LONG
    # the other keys are as they were
    assert _grpc_generate(server, TENANT_KEYS["lora-co"], "lora-rslora")[-1].adapter == "lora-rslora"
    assert client(server, ADMIN_KEY).completions.create(model=base, prompt="Hi", max_tokens=2).usage.completion_tokens
    _idle(server)
    [line] = [r for r in caplog.records if r.name == "nlora_serve.tenants"]
    assert (line.levelname, line.getMessage()) == (
        "INFO", f"tenants file {_tenants_file(server)} reloaded: removed 'base-co'")
    assert hash_key(key) not in caplog.text and key not in caplog.text


def test_a_new_tenant_gets_exactly_its_grants_on_both_front_ends(server, caplog):
    new = {"name": "new-co", "key_sha256": hash_key(NEW_KEY), "adapters": ["lora-*"], "base_model": False}
    with pytest.raises(Unauthenticated):  # not yet
        _grpc_generate(server, NEW_KEY, "lora-rslora")
    _write(_tenants_file(server), [*_entries(), new])
    with caplog.at_level(logging.INFO, logger="nlora_serve.tenants"):
        assert _reload(server) is True
    assert caplog.records[-1].getMessage().endswith("reloaded: added 'new-co'")
    assert _grpc_generate(server, NEW_KEY, "lora-rslora")[-1].adapter == "lora-rslora"
    with pytest.raises(PermissionDenied, match="'new-co' is not granted adapter 'inttune-nystrom-tied'"):
        _grpc_generate(server, NEW_KEY, "inttune-nystrom-tied")
    with pytest.raises(PermissionDenied, match="base model"):
        _grpc_generate(server, NEW_KEY)
    with NloraClient(server.target, api_key=NEW_KEY) as grpc_client:
        assert [a.name for a in grpc_client.list_adapters()[0]] == ["lora-rslora"]
        with pytest.raises(PermissionDenied, match="needs an admin key"):
            grpc_client.unload_adapter("lora-rslora")
    http = client(server, NEW_KEY)
    assert [m.id for m in http.models.list()] == ["lora-rslora"]
    answer = http.completions.create(model="lora-rslora", prompt="Hi", max_tokens=2, extra_body={"min_tokens": 2})
    assert answer.usage.completion_tokens == 2
    for ungranted in ("inttune-nystrom-tied", server.server.generation.info.model):
        with pytest.raises(openai.PermissionDeniedError):
            http.completions.create(model=ungranted, prompt="Hi", max_tokens=2)


def test_a_changed_quota_and_weight_bound_the_next_admissions(make_http_server, hold_steps):
    # --max-queue 4 with queue shares: a weight-w tenant alone may hold places while held < max(1, w * free)
    server = make_http_server(max_queue=4, tenant_queue_shares=True)
    stepping = hold_steps(server)
    base, key = server.server.generation.info.model, TENANT_KEYS["base-co"]

    def stream():
        chunks = iter(client(server, key).completions.create(model=base, prompt="Once upon a time", max_tokens=LONG,
                                                             temperature=0, stream=True,
                                                             extra_body={"min_tokens": LONG}))
        return [next(chunks)], chunks

    first = stream()
    second = stream()  # weight 1: held 1 < 1 x 3 free places
    _write(_tenants_file(server), _entries(**{"base-co": {"max_concurrent_requests": 2}}))
    assert _reload(server) is True
    stepping.clear()  # the streams run on, held, until the refusals are checked
    with pytest.raises(openai.RateLimitError, match="'base-co' has 2 requests running or waiting, its "
                                                     "max_concurrent_requests"):
        client(server, key).completions.create(model=base, prompt="Hi", max_tokens=2)
    with NloraClient(server.target, api_key=key, timeout=60) as grpc_client, \
            pytest.raises(ResourceExhausted, match="max_concurrent_requests"):
        list(grpc_client.generate(PROMPT, max_tokens=2))
    assert server.server.admission.held == {"base-co": 2}  # both ran through the refusals
    stepping.set()
    for got, chunks in (first, second):
        got += list(chunks)
        assert got[-1].choices[0].finish_reason == "length"
    _idle(server)
    third = stream()  # quota 2, none held: admitted
    _write(_tenants_file(server), _entries(**{"base-co": {"weight": 0.25}}))
    assert _reload(server) is True
    stepping.clear()
    # weight 0.25, one held: share max(1, 0.25 x 3 free places) = 1, held 1 >= 1: refused (before: 3)
    with pytest.raises(openai.RateLimitError, match="its share of the server's queue") as refused:
        client(server, key).completions.create(model=base, prompt="Hi", max_tokens=2)
    assert (refused.value.type, refused.value.code) == ("rate_limit_error", "tenant_queue_share")  # not queue_full
    assert server.server.admission.held == {"base-co": 1}
    stepping.set()
    third[0].extend(third[1])
    assert third[0][-1].choices[0].finish_reason == "length"
    _idle(server)


def test_a_file_the_loader_refuses_leaves_the_old_keys_in_force(server, caplog):
    path = _tenants_file(server)
    before = path.read_text()
    new = {"name": "new-co", "key_sha256": hash_key(NEW_KEY), "adapters": ["lora-*"]}
    bad_files = [
        ('{"tenants": [', "cannot read it"),  # a write cut short
        (json.dumps({"tenants": [*_entries(**{"base-co": None}), new], "admins": []}),
         "unknown field(s) 'admins'"),
        (json.dumps({"tenants": [{**new, "base_modle": True}]}), "unknown field(s) 'base_modle'"),
        (json.dumps({"tenants": [{**new, "weight": 0}]}), "tenants[0].weight must be a positive number"),
        (json.dumps({"tenants": [], "admin_keys": []}), "holds no key"),  # it was in force: every request refused
        (json.dumps({"tenants": [{**new, "name": "new-co\nERROR forged"}]}), "tenants[0].name 'new-co\\nERROR"),
        (None, "cannot read it"),  # the file is gone
    ]
    for text, why in bad_files:
        if text is None:
            path.unlink()
        else:
            path.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nlora_serve.tenants"):
            assert _reload(server) is False
        [line] = caplog.records
        assert line.levelname == "ERROR" and why in line.getMessage(), line.getMessage()
        assert line.getMessage().startswith("tenants file NOT reloaded, the keys read before stay in force: ")
        assert "\n" not in line.getMessage()  # one log line, whatever the file holds
        # the old keys, on both front ends, and not the new one
        assert _grpc_generate(server, TENANT_KEYS["base-co"])[-1].finish_reason == "length"
        assert client(server, TENANT_KEYS["lora-co"]).completions.create(
            model="lora-rslora", prompt="Hi", max_tokens=1).usage.completion_tokens == 1
        with pytest.raises(Unauthenticated):
            _grpc_generate(server, NEW_KEY, "lora-rslora")
        with pytest.raises(PermissionDenied):  # grants as before too
            _grpc_generate(server, TENANT_KEYS["tied-co"], "lora-rslora")
    path.write_text(before)
    assert _reload(server) is True


def test_without_a_tenants_file_a_reload_warns_and_auth_stays_off(base_fp32, tokenizer, tmp_path, caplog):
    make, running = server_factory(base_fp32, tokenizer, tmp_path)
    try:
        _no_auth_reload(make(None, http_port=0), caplog)
    finally:
        stop_all(running)


def _no_auth_reload(server, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="nlora_serve.tenants"):
        assert _reload(server) is False
    [line] = caplog.records
    assert line.levelname == "WARNING" and "started without --tenants-file: auth stays OFF" in line.getMessage()
    assert not server.server.auth.enabled
    assert _grpc_generate(server, "any-key-at-all")[-1].finish_reason == "length"  # every caller still admin
    assert client(server, "any").completions.create(model=server.server.generation.info.model, prompt="Hi",
                                                    max_tokens=1).usage.completion_tokens == 1


def test_new_weights_reach_the_fair_scheduler_the_prefix_cache_and_the_lora_slots(base_fp32, tokenizer, tmp_path):
    path = tmp_path / "tenants.json"
    _write(path, _entries(**{"lora-co": {"weight": 2}}))
    auth = Authenticator.from_file(path)
    engine_config = EngineConfig(
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, policy="fair",
                                  tenant_weights=auth.weights()),
        cache=CacheConfig(num_blocks=64), adapter_dir=str(tmp_path / "store"))
    engine = LLMEngine(engine_config, base_fp32)
    config = ServerConfig(port=0, tenants_file=str(path), tenant_queue_shares=True)
    server = RunningServer(engine, config, auth, server_info(base_fp32, engine_config, config), tokenizer)
    try:
        core = engine.core
        assert core.scheduler.fair.weights == core.blocks.shares.weights == {"lora-co": 2.0}
        _write(path, _entries(**{"lora-co": {}, "base-co": {"weight": 3}, "tied-co": {"weight": 0.5}}))
        assert _reload(server) is True
        # the scheduler's and cache's between steps: the next request's step comes after them
        assert _grpc_generate(server, TENANT_KEYS["base-co"])[-1].finish_reason == "length"
        want = {"base-co": 3.0, "tied-co": 0.5}  # lora-co back to 1: absent
        assert core.scheduler.fair.weights == want
        assert core.blocks.shares.weights == want
        assert engine.adapters.residency.tenant_shares == want
        assert engine_config.scheduler.tenant_weights == want  # what a reset_scheduling starts from
    finally:
        server.stop()
        engine.shutdown()


def test_serve_reloads_on_sighup_and_still_drains_on_sigterm(tmp_path):
    path = tmp_path / "tenants.json"
    _write(path, _entries())
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nlora_serve.serving.commands.serve", "--port", "0", "--http-port", "0",
             "--dtype", "float32", "--adapter-dir", str(tmp_path / "store"), "--max-model-len", "512",
             "--tenants-file", str(path), "--drain-seconds", "5", "--log-level", "INFO",
             "--kv-cache-memory-bytes", str(32 << 20)],  # 2-token answers: 45 blocks, not 1 GiB of zeroed pages
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ})
    try:
        lines = [proc.stdout.readline() for _ in range(5)]  # ready, the client hint, the HTTP API, the key line, HUP
        grpc_port = re.match(r"ready on 127\.0\.0\.1:(\d+);", lines[0])
        http_port = re.fullmatch(r"OpenAI-compatible HTTP API on http://127\.0\.0\.1:(\d+)/v1\n", lines[2])
        assert grpc_port and http_port, (lines, log_file.read_text())
        # the pid to signal is the server's own (under `make serve` a shell shows make's)
        assert lines[4] == f"  (kill -HUP {proc.pid} re-reads the tenants file after an edit)\n"
        target = f"127.0.0.1:{grpc_port.group(1)}"
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port.group(1)}/v1", api_key=NEW_KEY, max_retries=0)
        with pytest.raises(Unauthenticated):
            _grpc_generate(_Target(target), NEW_KEY)
        new = {"name": "new-co", "key_sha256": hash_key(NEW_KEY), "base_model": True, "max_concurrent_requests": 3}
        _write(path, [*_entries(**{"base-co": None}), new])
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reloaded" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [line for line in log_file.read_text().splitlines() if line.endswith(
            f"Z INFO nlora_serve.tenants: tenants file {path} reloaded: added 'new-co'; removed 'base-co'")]
        assert _grpc_generate(_Target(target), NEW_KEY)[-1].finish_reason == "length"
        assert [m.id for m in http.models.list()] != []
        with pytest.raises(Unauthenticated):
            _grpc_generate(_Target(target), TENANT_KEYS["base-co"])
        path.write_text("{")  # a bad file: logged, the process lives on with the keys in force
        proc.send_signal(signal.SIGHUP)
        while "NOT reloaded" not in log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "ERROR nlora_serve.tenants: tenants file NOT reloaded" in log_file.read_text()
        assert _grpc_generate(_Target(target), NEW_KEY)[-1].finish_reason == "length"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert log_file.read_text().splitlines()[-1].endswith("Z INFO nlora_serve.serve: drained, exiting")  # timed
    finally:
        if proc.poll() is None:
            proc.kill()


def _idle(server, timeout: float = 10.0) -> None:
    """Wait until every request has left the admission counts (a stream's last chunk can reach the
    client just before its reservation is released)."""
    deadline = time.monotonic() + timeout
    while server.server.admission.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.admission.inflight == 0 and server.server.admission.held == {}


class _Target:
    """What _grpc_generate needs of a server: its gRPC target."""

    def __init__(self, target: str):
        self.target = target
