"""top_k -1, vLLM's "off" (LangChain's VLLMOpenAI sends it by default), over gRPC: the proto's
top_k is uint32, so the client sends -1 unset and the server takes 2^32 - 1 (-1 cast to uint32, or
an int32 field's sign-extended varint) as off; every form samples the same seeded tokens as unset."""

from __future__ import annotations

import grpc
import pytest

from grpc_harness import TENANT_KEYS, write_tenants_file
from nlora_serve.client import NloraClient
from nlora_serve.client.messages import generate_request
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc

SAMPLED = dict(max_tokens=12, temperature=1.5, seed=7, ignore_eos=True)


def test_the_client_sends_minus_one_unset():
    assert not generate_request("hi", top_k=-1).sampling.HasField("top_k")
    assert generate_request("hi", top_k=0).sampling.HasField("top_k")


def test_the_client_sends_a_cache_salt():
    """GenerateRequest.cache_salt (README: a sharing group within the tenant) could not be sent by
    the Python client: it went into SamplingParams, which has no such field (ValueError)."""
    assert generate_request("hi", cache_salt="user-7", max_tokens=2).cache_salt == "user-7"
    assert generate_request("hi").cache_salt == ""


def test_a_sign_extended_minus_one_reads_as_uint32_max():
    """An int32 -1 is the varint of 2^64 - 1 (ten bytes); protobuf reads it into uint32 as 2^32 - 1."""
    field_4_varint = bytes([4 << 3]) + b"\xff" * 9 + b"\x01"
    assert pb.SamplingParams.FromString(field_4_varint).top_k == (1 << 32) - 1


@pytest.fixture(scope="module")
def server(make_module_server, tmp_path_factory):
    return make_module_server(write_tenants_file(tmp_path_factory.mktemp("tenants") / "tenants.json"))


def _raw_tokens(server, top_k: int) -> list[int]:
    request = pb.GenerateRequest(text="Once upon a time", sampling=pb.SamplingParams(top_k=top_k, **SAMPLED))
    with grpc.insecure_channel(server.target) as channel:
        stream = pb_grpc.GenerationStub(channel).Generate(
            request, metadata=(("authorization", f"Bearer {TENANT_KEYS['base-co']}"),))
        return [t for msg in stream for t in msg.token_ids]


def test_minus_one_samples_as_unset(server):
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=120) as client:
        def tokens(**extra) -> list[int]:
            return [t for d in client.complete("Once upon a time", **SAMPLED, **extra)[1] for t in d.token_ids]

        unset = tokens()
        assert tokens(top_k=-1) == tokens(top_k=0) == unset
        assert tokens(top_k=1) != unset  # the control: top_k reaches the sampler
    assert _raw_tokens(server, (1 << 32) - 1) == unset
