"""Request-size limits (serving/grpc_api/limits.py): the server-wide receive limit is what a legal
SwapAdapter carries, and every other method's messages are held to a bound of their own before they
are parsed. Before, the limit was --max-adapter-bytes + 1 MiB for every method (257 MiB), so a tenant
with a valid key could make the server take, copy and parse a 250 MB Generate request (hostile review)."""

from __future__ import annotations

import json
import struct

import grpc
import pytest
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest, ServerReflectionResponse

from grpc_harness import ADMIN_KEY, TENANT_KEYS, matches_reference
from nlora_serve.adapters.keys import PART_N, tensor_key
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.save import write_adapter
from nlora_serve.client import NloraClient
from nlora_serve.client.messages import generate_request
from nlora_serve.models.spec import PROJECTIONS
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.grpc_api.limits import message_limits
from serving_check import CASES

# By hand for the default model (SmolLM2-135M: 30 layers, 7 projections each) at --max-rank 64:
# N [64, 64] as F32 at 210 sites = 3,440,640 bytes, + the 8-byte length + the reader's 2 MiB header
# cap = 5,537,800 bytes of payload, + 1 MiB headroom for the rest of the message = 6,586,376.
SWAP_PAYLOAD = 210 * 64 * 64 * 4 + 8 + (2 << 20)
RECEIVE_LIMIT = SWAP_PAYLOAD + (1 << 20)
# SmolLM2's longest vocabulary entry is 81 characters (byte-level BPE: 81 bytes); a text prompt over
# 4 x 81 x max_model_len bytes is refused as too long (engine.api.max_prompt_bytes), + 1 MiB for the
# other fields: 1,380,352 bytes at the harness's max_model_len 1024, 1,712,128 at serve's 2048.
GENERATE_LIMIT = 4 * 81 * 1024 + (1 << 20)
GENERATE = "/nlora_serve.v1.Generation/Generate"


def _md(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def test_the_limits_for_the_default_model_are_the_hand_computed_numbers(make_server, base_fp32):
    assert (SWAP_PAYLOAD, RECEIVE_LIMIT, GENERATE_LIMIT) == (5_537_800, 6_586_376, 1_380_352)
    limits = make_server().server.limits  # --max-rank 64 (the default), max_model_len 1024
    assert (limits.receive_bytes, limits.generate_bytes) == (RECEIVE_LIMIT, GENERATE_LIMIT)
    assert limits.bound(GENERATE) == GENERATE_LIMIT
    assert limits.bound("/nlora_serve.v1.Generation/GetServerInfo") == 64 << 10
    assert limits.bound("/grpc.health.v1.Health/Check") == 64 << 10
    assert limits.bound("/nlora_serve.v1.AdapterAdmin/SwapAdapter") is None
    assert limits.bound("/nlora_serve.v1.AdapterAdmin/UploadAdapter") is None
    spec = base_fp32.spec
    serve = message_limits((spec, 64), 4 * 81 * 2048, 2048, 256 << 20)  # `serve`'s defaults
    assert (serve.receive_bytes, serve.generate_bytes) == (6_586_376, 1_712_128)
    # never below gRPC's default 4 MiB; never more swap than --max-adapter-bytes (+ headroom)
    assert message_limits((spec, 64), 1000, 16, 1_000_000).receive_bytes == 4 << 20
    assert message_limits((spec, 256), 1000, 16, 20 << 20).receive_bytes == (21 << 20)
    assert message_limits((spec, 256), 1000, 16, 256 << 20).receive_bytes == 210 * 256 * 256 * 4 + 8 + (3 << 20)
    assert message_limits(None, 1000, 16, 256 << 20).receive_bytes == 4 << 20  # no adapter store: no swap


def test_an_over_size_generate_by_a_tenant_is_refused_before_parsing_and_others_stream_on(
        make_server, tenants_file, parsed):
    server = make_server(tenants_file, tenant_metrics=True)
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        admin.upload_adapter("lora-rslora", CASES / "lora-rslora")
    parsed.clear()
    ref = json.loads((CASES / "lora-rslora" / "case.json").read_text())["references"][1]
    want = len(ref["greedy_token_ids"])
    salted = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), cache_salt="s" * (3 << 20),
                                sampling=pb.SamplingParams(max_tokens=1))
    prompt = pb.GenerateRequest(text="x" * (3 << 20), sampling=pb.SamplingParams(max_tokens=1))
    huge = pb.GenerateRequest(text="x" * (20 << 20), sampling=pb.SamplingParams(max_tokens=1))
    tenant = _md(TENANT_KEYS["base-co"])
    with NloraClient(server.target, api_key=TENANT_KEYS["lora-co"], timeout=120) as other, \
            grpc.insecure_channel(server.target) as channel:
        stream = other.generate(ref["prompt_token_ids"], adapter="lora-rslora", max_tokens=want, min_tokens=want)
        first = next(stream)  # another tenant's stream is running while the big requests arrive
        generation = pb_grpc.GenerationStub(channel)
        for request in (salted, prompt):
            size = request.ByteSize()
            with pytest.raises(grpc.RpcError) as err:
                list(generation.Generate(request, metadata=tenant, timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details() == (
                f"Generate: the request message is {size:,} bytes, over the server's bound of "
                f"{GENERATE_LIMIT:,} bytes for Generate requests (the largest a valid one can be); "
                "refused before parsing")
            # the reason it is counted under, as HTTP counts a body over its limit
            assert dict(err.value.trailing_metadata() or ()) == {"nlora-reason": "invalid_argument"}
        with pytest.raises(grpc.RpcError) as err:  # over the server-wide limit: grpc refuses it itself
            list(generation.Generate(huge, metadata=tenant, timeout=60))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{huge.ByteSize()} vs. {RECEIVE_LIMIT}" in err.value.details()
        # grpc's core ends that call before any handler runs: no server code can add a reason (decode.py)
        assert "nlora-reason" not in dict(err.value.trailing_metadata() or ())
        tokens = [t for d in (first, *stream) for t in d.token_ids]
    other_request = generate_request(ref["prompt_token_ids"], adapter="lora-rslora", max_tokens=want, min_tokens=want)
    assert parsed == [(GENERATE, other_request.ByteSize())]  # only the other tenant's request was parsed
    assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"]), tokens
    assert server.server.admission.inflight == 0
    # the two refused by their bound are counted as the servicer counts a refusal (grpc's own are not)
    assert server.server.metrics.rejected.labels("invalid_argument", "grpc")._value.get() == 2
    # and as base-co's, whose key the call carried; lora-co's stream ran to its end
    samples = {(s.labels["tenant"], s.labels["outcome"]): s.value
               for s in server.server.metrics.tenant_requests.collect()[0].samples if s.name.endswith("_total")}
    assert samples == {("base-co", "rejected"): 2, ("lora-co", "finished"): 1}


def test_small_rpcs_and_health_refuse_large_messages_before_parsing(make_server, tenants_file, parsed):
    server = make_server(tenants_file)
    junk = b"\x00" * ((64 << 10) + 1)  # not even valid protobuf: the bound comes first
    with grpc.insecure_channel(server.target) as channel:
        for method, metadata in (("/nlora_serve.v1.Generation/GetServerInfo", _md(TENANT_KEYS["base-co"])),
                                 ("/nlora_serve.v1.AdapterAdmin/UnloadAdapter", _md(ADMIN_KEY)),
                                 ("/grpc.health.v1.Health/Check", ())):
            call = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as err:
                call(junk, metadata=metadata, timeout=60)
            name = method.rsplit("/", 1)[-1]
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, err.value)
            assert err.value.details().startswith(f"{name}: the request message is 65,537 bytes, over the "
                                                  f"server's bound of 65,536 bytes for {name} requests")
            assert dict(err.value.trailing_metadata() or ()) == {"nlora-reason": "invalid_argument"}
        # reflection (stream-stream, no key) too, and a small request still lists the services
        info = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=ServerReflectionRequest.SerializeToString,
                                     response_deserializer=ServerReflectionResponse.FromString)
        big = ServerReflectionRequest(list_services="x" * (64 << 10))
        with pytest.raises(grpc.RpcError) as err:
            list(info(iter([big]), timeout=60))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"ServerReflectionInfo: the request message is {big.ByteSize():,} bytes" in err.value.details()
        assert parsed == []
        answer, = info(iter([ServerReflectionRequest(list_services="")]), timeout=60)
    assert "nlora_serve.v1.Generation" in {s.name for s in answer.list_services_response.service}


def _n_payload(keys: list[str], rank: int, header_bytes: int) -> bytes:
    """An N-only safetensors file: zero F32 N [rank, rank] under each key, its JSON header padded
    with spaces (as safetensors pads) to exactly ``header_bytes``."""
    size = rank * rank * 4
    entries = {k: {"dtype": "F32", "shape": [rank, rank], "data_offsets": [i * size, (i + 1) * size]}
               for i, k in enumerate(keys)}
    header = json.dumps(entries).encode()
    assert len(header) <= header_bytes
    return struct.pack("<Q", header_bytes) + header.ljust(header_bytes, b" ") + bytes(size * len(keys))


def test_the_largest_legal_swap_fits_and_one_byte_more_message_is_refused(make_server, base_fp32, tmp_path):
    server = make_server()
    # the max rank, every site; its N nonzero, so the zero-N swap below is new content (a new version)
    adapter = init_adapter(base_fp32, rank=64, targets="all-linear")
    write_adapter(adapter, tmp_path / "r64", tied_form=True)
    with NloraClient(server.target, timeout=120) as admin:
        assert admin.upload_adapter("r64", tmp_path / "r64").version == 1
        keys = [tensor_key(layer, module, PART_N) for layer in range(base_fp32.spec.num_layers)
                for module in PROJECTIONS]
        payload = _n_payload(keys, 64, 2 << 20)  # the reader's header cap
        assert len(payload) == SWAP_PAYLOAD
        info = admin.swap_adapter("r64", payload)
        assert (info.version, info.rank) == (2, 64)
        request = pb.SwapAdapterRequest(name="r64", n_safetensors=b"\0" * (RECEIVE_LIMIT - 8))
        assert request.ByteSize() > RECEIVE_LIMIT
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.AdapterAdminStub(channel).SwapAdapter(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{request.ByteSize()} vs. {RECEIVE_LIMIT}" in err.value.details()
        assert server.engine.adapters.registry.get("r64").version == 2
