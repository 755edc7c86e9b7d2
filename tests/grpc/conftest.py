"""Fixtures for the gRPC tests: fp32 engines on the default model behind real loopback servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpc_harness import RunningServer
from nlora_serve.serving.auth import Authenticator, hash_key
from nlora_serve.serving.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.serving.engine import LLMEngine
from nlora_serve.serving.grpc_convert import server_info
from nlora_serve.serving.server_config import ServerConfig

from grpc_harness import ADMIN_KEY, TENANT_KEYS  # a uniquely named module: "conftest" is ambiguous
GRANTS = {"tied-co": (["inttune-*"], False), "lora-co": (["lora-rslora"], True), "base-co": ([], True)}


@pytest.fixture(scope="session")
def tokenizer(base_fp32):
    return base_fp32.tokenizer()


@pytest.fixture
def tenants_file(tmp_path):
    """A tenants file (hashes only) granting tied-co inttune-*, lora-co lora-rslora (+ base)."""
    doc = {"admin_keys": [{"name": "ops", "key_sha256": hash_key(ADMIN_KEY)}],
           "tenants": [{"name": name, "key_sha256": hash_key(TENANT_KEYS[name]), "adapters": adapters,
                        "base_model": base} for name, (adapters, base) in GRANTS.items()]}
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(doc))
    return path


def _factory(base, tokenizer, root: Path):
    """(make, running): make(auth=None, num_blocks=256, max_num_seqs=32, **ServerConfig overrides)
    starts a server over a fresh engine whose adapter store lives under ``root``."""
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


def _stop_all(running: list[RunningServer]) -> None:
    for server in running:
        server.stop()
        server.engine.shutdown()


@pytest.fixture
def make_server(base_fp32, tokenizer, tmp_path):
    """Factory for servers that live for one test (see :func:`_factory`)."""
    make, running = _factory(base_fp32, tokenizer, tmp_path)
    yield make
    _stop_all(running)


@pytest.fixture(scope="module")
def make_module_server(base_fp32, tokenizer, tmp_path_factory):
    """Factory for servers shared by one test module (tests must not depend on each other's state)."""
    make, running = _factory(base_fp32, tokenizer, tmp_path_factory.mktemp("grpc"))
    yield make
    _stop_all(running)
