"""Each failure gets its status code, frees what it held, and the server keeps serving others."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nlora_serve.client import (DeadlineExceeded, FailedPrecondition, InvalidArgument, NloraClient,
                                NloraClientError, NotFound, ResourceExhausted)
from nlora_serve.client.messages import upload_parts
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.server_config import ServerConfig
from serving_check import CASES, TIED, still_serves

LONG = dict(max_tokens=400, ignore_eos=True)
PROMPT = [1, 9690, 198, 2683, 359, 253]


@pytest.fixture(scope="module")
def server(make_module_server):
    server = make_module_server(max_queue=3)
    with NloraClient(server.target) as admin:
        admin.upload_adapter(TIED, CASES / TIED)
    return server


def _wait_idle(engine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def test_client_disconnect_and_deadline_free_kv_blocks_and_pins(server):
    version = server.engine.adapters.registry.get(TIED)
    with NloraClient(server.target) as client:
        stream = client.generate(PROMPT, adapter=TIED, **LONG)
        first = [next(stream) for _ in range(3)]
        assert server.engine.stats()["kv_blocks_used"] > 0 and version.refcount == 1
        stream.close()  # leaves mid-stream: the call is cancelled
    _wait_idle(server.engine)
    assert version.refcount == 0 and {d.adapter_version for d in first} == {version.version}
    with NloraClient(server.target) as client, pytest.raises(DeadlineExceeded):
        list(client.generate(PROMPT, adapter=TIED, timeout=0.5, **LONG))
    _wait_idle(server.engine)
    assert version.refcount == 0 and server.server.admission.inflight == 0
    still_serves(server.target)


def test_queue_overflow_is_resource_exhausted(server):
    with NloraClient(server.target) as client:
        streams = [client.generate(PROMPT, **LONG) for _ in range(3)]
        for s in streams:
            next(s)  # admitted and running
        busy = r"^RESOURCE_EXHAUSTED: server queue is full \(the server is busy\); retry with backoff$"  # no count
        with pytest.raises(ResourceExhausted, match=busy):
            list(client.generate(PROMPT, max_tokens=2))
        for s in streams:
            s.close()
    _wait_idle(server.engine)
    still_serves(server.target)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=PROMPT, temperature=-1.0), "temperature must be in"),
    (dict(prompt=PROMPT, top_p=1.5), "top_p must be in"),
    (dict(prompt=PROMPT, max_tokens=4, min_tokens=9), "min_tokens"),
    (dict(prompt=""), "text is empty"),
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[10 ** 6]), "token ids must be in"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "role 'wizard'"),
])
def test_malformed_requests_are_invalid_argument(server, kwargs, message):
    with NloraClient(server.target) as client, pytest.raises(InvalidArgument, match=message):
        list(client.generate(**kwargs))
    assert server.server.admission.inflight == 0
    still_serves(server.target)


@pytest.mark.parametrize("method, kind", [("/nlora_serve.v1.Generation/Generate", "unary_stream"),
                                          ("/nlora_serve.v1.Generation/ListAdapters", "unary_unary"),
                                          ("/nlora_serve.v1.AdapterAdmin/UploadAdapter", "stream_unary"),
                                          ("/grpc.health.v1.Health/Check", "unary_unary"),
                                          ("/grpc.health.v1.Health/Watch", "unary_stream")])
def test_bytes_that_are_not_protobuf_are_invalid_argument(server, method, kind, caplog):
    """A request that does not parse as its message type is the caller's error (INVALID_ARGUMENT,
    naming the method), not a server fault (grpc's own answer is UNKNOWN, with a traceback logged:
    for the keyless health service, a way to fill the log)."""
    garbage = b"\xff\xff\xff\xff\xff"  # a field tag whose varint never ends
    with grpc.insecure_channel(server.target) as channel:
        call = getattr(channel, kind)(method)  # no (de)serializers: raw bytes both ways
        with pytest.raises(grpc.RpcError) as err:
            if kind == "unary_stream":
                list(call(garbage))
            elif kind == "stream_unary":
                call(iter([garbage]))
            else:
                call(garbage)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert method in err.value.details() and "not a valid protobuf" in err.value.details()
    assert dict(err.value.trailing_metadata() or ()) == {"nlora-reason": "invalid_argument"}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert server.server.admission.inflight == 0
    still_serves(server.target)


def test_health_watch_and_reflection_answer_through_the_request_parser(server):
    """Parsing in the handler (BoundedDecode) iterated every server-streaming handler: Health/Watch,
    which writes with context.write, failed with UNKNOWN ("'async for' requires an object with
    __aiter__ method, got coroutine"), so grpc's client-side health checking could not watch us."""
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                     timeout=10))
        assert "nlora_serve.v1.Generation" in [s.name for s in reply.list_services_response.service]
    still_serves(server.target)


def test_unknown_adapter_is_not_found_never_the_base_model(server):
    with NloraClient(server.target) as client, pytest.raises(NotFound, match="'nobody' is not registered"):
        list(client.generate(PROMPT, adapter="nobody", max_tokens=2))
    still_serves(server.target)


@pytest.mark.parametrize("case, words", [("nan-weights", ("nan", "finite")), ("dora", ("dora",)),
                                         ("rank-over-limit", ("128",)), ("shape-mismatch", ("577",))])
def test_invalid_adapter_upload_is_invalid_argument_with_the_reason(server, case, words):
    with NloraClient(server.target) as admin, pytest.raises(InvalidArgument) as err:
        admin.upload_adapter("bad", CASES / case)
    assert any(w in str(err.value).lower() for w in words), str(err.value)
    assert err.value.reason == "invalid_argument"  # nlora-reason, as HTTP's load_lora_adapter answers the code
    assert "bad" not in {v.name for v in server.engine.adapters.versions()}
    still_serves(server.target)


def test_oversized_upload_is_resource_exhausted(make_server):
    small = make_server(max_adapter_bytes=1_000_000)
    with NloraClient(small.target) as admin:
        with pytest.raises(ResourceExhausted, match=r"2220\d{3} bytes is over the server's --max-adapter-bytes 1000000"):
            admin.upload_adapter("big", CASES / "lora-rslora")  # 2.2 MB
        with pytest.raises(ResourceExhausted, match="--max-adapter-bytes"):
            admin.swap_adapter("big", b"\0" * 1_000_001)
        assert admin.upload_adapter("small", CASES / "lora-layers-subset").version == 1  # 0.39 MB fits
    still_serves(small.target, adapter=None)


def test_swap_payloads_over_grpcs_4_mib_default_reach_the_servers_own_checks(server, make_server):
    """gRPC's default 4 MiB receive limit would answer RESOURCE_EXHAUSTED "Received message larger
    than max" before our validation; the server allows max_adapter_bytes + 1 MiB."""
    assert ServerConfig(max_adapter_bytes=5 << 20).max_message_bytes == 6 << 20
    assert ServerConfig(max_adapter_bytes=4 << 30).max_message_bytes == 2 ** 31 - 1  # gRPC's int32 cap
    current = server.engine.adapters.registry.get(TIED).version
    with NloraClient(server.target) as admin, pytest.raises(InvalidArgument) as err:
        admin.swap_adapter(TIED, b"\0" * (5 << 20))  # garbage under the default 256 MiB limit
    assert "not a readable safetensors file" in str(err.value) and "5242880 bytes" in str(err.value)
    assert server.engine.adapters.registry.get(TIED).version == current
    small = make_server(max_adapter_bytes=5 << 20)
    with NloraClient(small.target) as admin, pytest.raises(ResourceExhausted) as err:
        admin.swap_adapter("big", b"\0" * ((5 << 20) + 1))
    assert str(err.value) == ("RESOURCE_EXHAUSTED: adapter 'big': 5242881 bytes is over the server's "
                              "--max-adapter-bytes 5242880")


def test_inconsistent_uploads_are_invalid_argument(server):
    stub = pb_grpc.AdapterAdminStub(grpc.insecure_channel(server.target))
    parts = list(upload_parts("lora-x", CASES / "lora-rslora", chunk_bytes=1 << 20))
    short = [pb.UploadAdapterRequest(header=parts[0].header), *parts[1:-1]]
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadAdapter(iter(short))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header announced" in err.value.details()
    lying = pb.UploadHeader(name="lora-x", adapter_config_json=parts[0].header.adapter_config_json,
                            safetensors_bytes=parts[0].header.safetensors_bytes, safetensors_sha256="0" * 64)
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadAdapter(iter([pb.UploadAdapterRequest(header=lying), *parts[1:]]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadAdapter(iter(parts[1:]))  # chunks without a header
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first message" in err.value.details()
    still_serves(server.target)


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", ".hidden", "a/b", "x" * 200, ""])
def test_path_escaping_names_are_invalid_argument(server, name, tmp_path):
    with NloraClient(server.target) as admin:
        with pytest.raises(InvalidArgument, match="is not valid"):
            admin.upload_adapter(name, CASES / "lora-rslora")
        with pytest.raises(InvalidArgument, match="is not valid"):
            admin.swap_adapter(name, b"x")
        with pytest.raises(InvalidArgument, match="is not valid"):
            admin.load_adapter(name)
    store = server.engine.adapters.registry.store.root
    assert not any(p.name.startswith("escape") for p in store.parent.iterdir())
    assert all(p.name in (".staging", ".base_model.json", TIED, "lora-rslora") for p in store.iterdir())
    still_serves(server.target)


def test_swap_refusals(server):
    current = server.engine.adapters.registry.get(TIED).version
    with NloraClient(server.target) as admin:
        admin.upload_adapter("lora-rslora", CASES / "lora-rslora")
        # each with its reason in nlora-reason (status.py's table; HTTP's error code for the same refusal)
        with pytest.raises(InvalidArgument, match="not a tied IntTune tenant") as tied:
            admin.swap_adapter("lora-rslora", b"whatever")
        with pytest.raises(InvalidArgument) as garbage:
            admin.swap_adapter(TIED, b"not safetensors")
        with pytest.raises(FailedPrecondition, match=f"expected current version 70, have {current}") as stale:
            admin.swap_adapter(TIED, (server.engine.adapters.registry.get(TIED).path
                                      / "adapter_model.safetensors").read_bytes(), if_version=70)
        with pytest.raises(NotFound) as unknown:
            admin.swap_adapter("nobody", b"x")
        with pytest.raises(InvalidArgument, match="is not valid") as bad_name:
            admin.unload_adapter("../escape")
    assert [e.value.reason for e in (tied, garbage, stale, unknown, bad_name)] == \
        ["invalid_argument", "invalid_argument", "invalid_argument", "not_found", "invalid_argument"]
    assert server.engine.adapters.registry.get(TIED).version == current
    still_serves(server.target)


def test_unload_then_load_from_the_store(server):
    with NloraClient(server.target) as admin:
        before = server.engine.adapters.registry.get(TIED)
        stream = admin.generate(PROMPT, adapter=TIED, **LONG)
        next(stream)
        unloaded = admin.unload_adapter(TIED, force=True)
        assert unloaded.ref.version == before.version and unloaded.aborted_requests == 1
        with pytest.raises(NloraClientError) as err:  # the stream ends with the reason, not a bare "abort"
            list(stream)
        assert err.value.code == grpc.StatusCode.ABORTED and err.value.reason == "aborted"  # HTTP's code too
        assert f"adapter '{TIED}' v{before.version} was unloaded" in str(err.value)
        with pytest.raises(NotFound):
            list(admin.generate(PROMPT, adapter=TIED, max_tokens=2))
        loaded = admin.load_adapter(TIED)
        assert (loaded.version, loaded.content_hash) == (before.version + 1, before.content_hash)
        with pytest.raises(NotFound, match="no stored version") as err:
            admin.load_adapter("never-stored")
        assert err.value.reason == "not_found"
    _wait_idle(server.engine)
    assert before.refcount == 0 and before.freed
    still_serves(server.target)


def test_concurrent_loads_of_one_unloaded_name_make_one_version(server):
    """20 concurrent `adapters load` of one unloaded name made 8 versions of the same files, and the
    others were NOT_FOUND: their reads found the folders the first ones' --keep-versions pruned."""
    from concurrent.futures import ThreadPoolExecutor

    with NloraClient(server.target) as admin:
        first = admin.upload_adapter("load-race", CASES / "lora-layers-subset")
        admin.unload_adapter("load-race")
        with ThreadPoolExecutor(12) as pool:
            loaded = list(pool.map(lambda _: admin.load_adapter("load-race"), range(12)))
        assert {(a.version, a.content_hash) for a in loaded} == {(first.version + 1, first.content_hash)}
        assert server.engine.adapters.registry.store.versions("load-race") == [first.version + 1]
        admin.unload_adapter("load-race")


def test_an_unload_counts_the_requests_a_held_response_has_still_to_queue_as_draining(server):
    """An HTTP response of several requests (n > 1, a batch of prompts) holds its version and queues
    them one by one (AdapterManager.hold, as serving/http_api/generate.py): an unload without force
    lets those not queued yet run too. A response of 3 with its first request pinned and 2 to come,
    beside a running gRPC stream: 1 + 1 + 2 = 4 draining (it read 2, the pinned ones only)."""
    manager = server.engine.adapters
    before = manager.registry.get(TIED)
    held = manager.hold(TIED, 3)
    first = manager.acquire(TIED, None, held)  # its first request (no engine request behind it here)
    with NloraClient(server.target) as admin:
        stream = admin.generate(PROMPT, adapter=TIED, **LONG)
        next(stream)
        unloaded = admin.unload_adapter(TIED)
        assert (unloaded.ref.version, unloaded.aborted_requests, unloaded.draining_requests) == (before.version, 0, 4)
        stream.close()
        manager.release(first)
        manager.let_go(held)  # its other two never queued
        _wait_idle(server.engine)
        assert (before.refcount, before.holds, before.to_come, before.freed) == (0, 0, 0, True)
        admin.load_adapter(TIED)
    still_serves(server.target)


def test_a_rollback_to_a_version_not_kept_is_not_found_naming_those_kept(server, capsys):
    # LoadAdapter with a version (`adapters load --name NAME --version V`): a live rollback to a version
    # kept in the store (serve --keep-versions), registered as the name's next version as an upload is
    from nlora_serve.cli import main

    registry = server.engine.adapters.registry
    registry.keep_versions = 2  # as serve --keep-versions 2 sets it (this module's server keeps 1)
    try:
        with NloraClient(server.target, timeout=120) as admin:
            first = admin.upload_adapter("rollback-co", CASES / TIED)
            upgrade = admin.upload_adapter("rollback-co", CASES / "lora-rslora")
            assert (first.version, upgrade.version) == (1, 2) and upgrade.content_hash != first.content_hash
            assert admin.load_adapter("rollback-co", 2).version == 2  # the current version: returned as is
            with pytest.raises(NotFound, match=r"adapter 'rollback-co' has no version 7 kept in the adapter store "
                                               r"\(kept: v1, v2; serve --keep-versions N keeps the newest N\)"):
                admin.load_adapter("rollback-co", 7)
        assert main(["adapters", "load", "--server", server.target, "--name", "rollback-co", "--version", "1"]) == 0
        assert '"version": 3' in capsys.readouterr().out
        back = registry.get("rollback-co")
        assert (back.version, back.content_hash) == (3, first.content_hash)  # v1's maths, the next number
        registry.store.wait_deleted()
        assert registry.store.versions("rollback-co") == [2, 3]  # the newest 2 kept
    finally:
        registry.keep_versions = 1
