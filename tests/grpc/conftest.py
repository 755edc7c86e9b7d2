"""Fixtures for the gRPC tests: fp32 engines on the default model behind real loopback servers."""

from __future__ import annotations

import pytest

# a uniquely named module: "conftest" is ambiguous
from grpc_harness import server_factory, stop_all, write_tenants_file
from nlora_serve.serving.grpc_api import decode as grpc_decode


@pytest.fixture(scope="session")
def tokenizer(base_fp32):
    """The front end's own tokenizer, as ``serve`` loads one beside the engine's."""
    from nlora_serve.models import BaseModel

    return BaseModel.tokenizer(base_fp32)


@pytest.fixture
def tenants_file(tmp_path):
    """A tenants file (hashes only) granting tied-co inttune-*, lora-co lora-rslora (+ base)."""
    return write_tenants_file(tmp_path / "tenants.json")


@pytest.fixture
def make_server(base_fp32, tokenizer, tmp_path):
    """Factory for servers that live for one test (see :func:`grpc_harness.server_factory`)."""
    make, running = server_factory(base_fp32, tokenizer, tmp_path)
    yield make
    stop_all(running)


@pytest.fixture(scope="module")
def make_module_server(base_fp32, tokenizer, tmp_path_factory):
    """Factory for servers shared by one test module (tests must not depend on each other's state)."""
    make, running = server_factory(base_fp32, tokenizer, tmp_path_factory.mktemp("grpc"))
    yield make
    stop_all(running)


@pytest.fixture
def parsed(monkeypatch):
    """(method, bytes) of every request message handed to the protobuf parser (a spy on grpc_decode)."""
    seen, real_parser = [], grpc_decode._parser

    def spy(deserialize, method):
        parse = real_parser(deserialize, method)

        async def recorded(raw, context):
            seen.append((method, len(raw)))
            return await parse(raw, context)
        return recorded
    monkeypatch.setattr(grpc_decode, "_parser", spy)
    return seen
