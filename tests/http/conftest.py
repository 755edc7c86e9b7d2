"""Fixtures for the HTTP tests: the gRPC tests' loopback servers (tests/grpc/grpc_harness.py) with
the OpenAI-compatible HTTP port on, driven with the official ``openai`` client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "grpc"))  # the shared server harness

from grpc_harness import server_factory, stop_all, write_tenants_file  # noqa: E402
from http_harness import CASES, TENANTS  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(base_fp32):
    """The front end's own tokenizer, as ``serve`` loads one beside the engine's."""
    from nlora_serve.models import BaseModel

    return BaseModel.tokenizer(base_fp32)


@pytest.fixture(scope="module")
def http_server(base_fp32, tokenizer, tmp_path_factory):
    """One server per test module: keys and grants as in the gRPC tests, the two reference
    adapters registered, HTTP and metrics on free ports. Tests must leave it idle."""
    root = tmp_path_factory.mktemp("http")
    make, running = server_factory(base_fp32, tokenizer, root)
    server = make(write_tenants_file(root / "tenants.json"), http_port=0, metrics_port=0)
    for name in TENANTS:
        server.engine.adapters.register_dir(name, CASES / name)
    yield server
    stop_all(running)


@pytest.fixture
def make_http_server(base_fp32, tokenizer, tmp_path):
    """Factory for servers that live for one test: make(**ServerConfig overrides), auth and HTTP on."""
    make, running = server_factory(base_fp32, tokenizer, tmp_path)
    yield lambda **overrides: make(write_tenants_file(tmp_path / "tenants.json"), http_port=0, **overrides)
    stop_all(running)
