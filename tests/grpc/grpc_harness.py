"""A real NloraServer on a loopback port, run on its own event loop in a background thread.

Tests talk to it with the public clients from the test thread, as a remote caller would. The
gRPC and HTTP tests (tests/http puts this folder on sys.path) start their servers from here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from pathlib import Path

from nlora_serve.serving.auth import Authenticator, hash_key
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server import NloraServer
from nlora_serve.serving.server_config import ServerConfig

ADMIN_KEY = "admin-key-for-tests"
TENANT_KEYS = {"tied-co": "key-of-tied-co", "lora-co": "key-of-lora-co", "base-co": "key-of-base-co"}
# tenant -> (granted adapter names or patterns, may use the base model)
GRANTS = {"tied-co": (["inttune-*"], False), "lora-co": (["lora-rslora"], True), "base-co": ([], True)}


def write_tenants_file(path: Path) -> Path:
    """A tenants file (hashes only) at ``path``: the ``ops`` admin key and the :data:`GRANTS` tenants."""
    doc = {"admin_keys": [{"name": "ops", "key_sha256": hash_key(ADMIN_KEY)}],
           "tenants": [{"name": name, "key_sha256": hash_key(TENANT_KEYS[name]), "adapters": adapters,
                        "base_model": base} for name, (adapters, base) in GRANTS.items()]}
    path.write_text(json.dumps(doc))
    return path


class RunningServer:
    """Starts ``NloraServer(*args)`` on a private loop; ``target`` is its ``host:port``."""

    def __init__(self, engine, config, auth, info, tokenizer):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self._thread.start()
        self.server = NloraServer(engine, config, auth, info, tokenizer)
        self.call(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    def call(self, coro, timeout: float = 60.0):
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> bool:
        drained = self.call(self.server.shutdown(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        return drained


def matches_reference(got: list[int], want: list[int], margins: list[float]) -> bool:
    """The cases README rule (tests/engine/greedy_rule.py): equal up to the first step whose
    top-2 logit margin in the reference is below 1e-3."""
    for step, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return min(margins[: step + 1]) < 1e-3
    return len(got) >= len(want)


def server_factory(base, tokenizer, root: Path):
    """(make, running): make(auth=None, num_blocks=256, max_num_seqs=32, **ServerConfig overrides)
    starts a server over a fresh fp32 engine whose adapter store lives under ``root``."""
    running: list[RunningServer] = []

    def make(auth=None, num_blocks: int = 256, max_num_seqs: int = 32, **overrides) -> RunningServer:
        engine_config = EngineConfig(
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, max_model_len=1024),
            cache=CacheConfig(num_blocks=num_blocks), adapter_dir=str(root / f"store{len(running)}"))
        engine = LLMEngine(engine_config, base)
        config = ServerConfig(port=0, tenants_file=str(auth) if auth else None, **overrides)
        authenticator = Authenticator.from_file(auth) if auth else Authenticator(None)
        running.append(RunningServer(engine, config, authenticator, server_info(base, engine_config, config),
                                     tokenizer))
        return running[-1]

    return make, running


def stop_all(running: list[RunningServer]) -> None:
    """Stop every server and its engine, and free them now (a worker runs hundreds of tests: a
    stopped engine, ~1 GB with its packed weights, waited for the cycle collector otherwise)."""
    for server in running:
        server.stop()
        server.engine.shutdown()
    running.clear()
    gc.collect()
