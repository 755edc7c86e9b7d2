"""Keys and grants on a server: tenants use only their adapters, admin RPCs need an admin key (the
tenants file's own checks: test_tenants_file.py)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from nlora_serve.client import InvalidArgument, NloraClient, NotFound, PermissionDenied, Unauthenticated
from nlora_serve.errors import NloraError
from nlora_serve.log_format import JsonFormatter
from nlora_serve.serving.admin_log import AdminRefusals
from nlora_serve.serving.auth import Authenticator, Principal, hash_key
from nlora_serve.serving.auth import PermissionDenied as AuthPermissionDenied
from nlora_serve.serving.request_log import RequestLog

CASES = Path(__file__).parents[1] / "data" / "cases"
PROMPT = [1, 9690, 198, 2683]


@pytest.fixture
def server(make_server, tenants_file):
    server = make_server(tenants_file)
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        for name in ("inttune-nystrom-tied", "lora-rslora"):
            admin.upload_adapter(name, CASES / name)
    return server


def _generate(server, key, adapter=None):
    with NloraClient(server.target, api_key=key, timeout=60) as client:
        return client.complete(PROMPT, adapter=adapter, max_tokens=2)[1]


def test_a_tenant_cannot_use_another_tenants_adapter(server):
    with pytest.raises(PermissionDenied, match="'tied-co' is not granted adapter 'lora-rslora'"):
        _generate(server, TENANT_KEYS["tied-co"], "lora-rslora")
    with pytest.raises(PermissionDenied, match="not granted adapter 'inttune-nystrom-tied'"):
        _generate(server, TENANT_KEYS["lora-co"], "inttune-nystrom-tied")
    with pytest.raises(PermissionDenied, match="base model"):
        _generate(server, TENANT_KEYS["tied-co"])  # base_model false
    # a grant does not reveal whether an ungranted name exists: denied before the lookup
    with pytest.raises(PermissionDenied):
        _generate(server, TENANT_KEYS["lora-co"], "no-such-adapter")
    assert _generate(server, TENANT_KEYS["tied-co"], "inttune-nystrom-tied")[-1].adapter_version == 1
    assert _generate(server, TENANT_KEYS["lora-co"], "lora-rslora")[-1].adapter == "lora-rslora"
    assert _generate(server, TENANT_KEYS["lora-co"])[-1].adapter == ""
    # the base model's name, as HTTP's 'model' takes it: said so to a caller granted the base model
    # (it read "not granted adapter"), the refusal of any other name to one that is not
    with pytest.raises(InvalidArgument, match="^INVALID_ARGUMENT: GenerateRequest.adapter 'SmolLM2-135M-Instruct.Q4_1' is the base "
                                              "model's name: leave adapter empty to run the base model$"):
        _generate(server, TENANT_KEYS["lora-co"], "SmolLM2-135M-Instruct.Q4_1")
    with pytest.raises(PermissionDenied, match="^PERMISSION_DENIED: key of 'tied-co' is not granted adapter "
                                               "'SmolLM2-135M-Instruct.Q4_1'$"):
        _generate(server, TENANT_KEYS["tied-co"], "SmolLM2-135M-Instruct.Q4_1")


def test_unknown_or_missing_keys_are_unauthenticated(server):
    for key in ("not-a-key", None, TENANT_KEYS["tied-co"] + "x"):
        with pytest.raises(Unauthenticated):
            _generate(server, key, "inttune-nystrom-tied")
        with NloraClient(server.target, api_key=key) as client, pytest.raises(Unauthenticated):
            client.list_adapters()


def test_the_client_cli_without_a_key_says_how_to_give_one(server, capsys, monkeypatch):
    from nlora_serve.client.cli import main as client_main

    monkeypatch.delenv("NLORA_API_KEY", raising=False)
    for unset in ([], ["--api-key", ""]):  # serve's hint pastes --api-key "$NLORA_API_KEY"
        assert client_main(["--server", server.target, *unset, "list"]) == 2
        assert capsys.readouterr().err == (
            "error: UNAUTHENTICATED: missing credentials: send 'authorization: Bearer <key>' (an HTTP header or "
            "gRPC metadata); this server wants a key: --api-key KEY or $NLORA_API_KEY\n")
    assert client_main(["--server", server.target, "--api-key", "not-a-key", "list"]) == 2
    assert capsys.readouterr().err == "error: UNAUTHENTICATED: unknown API key\n"  # a key was given: no hint


def test_admin_rpcs_need_an_admin_key_and_each_change_is_logged_naming_the_admin(server, caplog):
    caplog.set_level(logging.INFO, logger="nlora_serve.serving.grpc_api.admin")
    for key in TENANT_KEYS.values():
        with NloraClient(server.target, api_key=key) as client:
            with pytest.raises(PermissionDenied, match="SwapAdapter needs an admin key"):
                client.swap_adapter("inttune-nystrom-tied", b"")
            with pytest.raises(PermissionDenied, match="UploadAdapter needs an admin key"):
                client.upload_adapter("evil", CASES / "lora-rslora")
            with pytest.raises(PermissionDenied):
                client.unload_adapter("lora-rslora", force=True)
            with pytest.raises(PermissionDenied):
                client.load_adapter("lora-rslora")
    with NloraClient(server.target, api_key="nobody") as client, pytest.raises(Unauthenticated):
        client.unload_adapter("lora-rslora")
    # refused calls changed nothing; each known key's refusal is logged naming it (h99: an operator
    # reading the log after an incident sees a tenant key calling admin RPCs), a key-less one is not
    # (and the address the call came from: the client's port is its own, so only its form is checked)
    said = [re.sub(r" from 127\.0\.0\.1:\d+ ", " from 127.0.0.1:PORT ", r.getMessage()) for r in caplog.records]
    assert said == [f"{rpc} by tenant {name!r} from 127.0.0.1:PORT refused (PERMISSION_DENIED): {rpc} needs an admin "
                    f"key; {name!r} is a tenant key" for name in TENANT_KEYS
                    for rpc in ("SwapAdapter", "UploadAdapter", "UnloadAdapter", "LoadAdapter")]
    caplog.clear()
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        assert {a.name for a in admin.list_adapters()[0]} == {"inttune-nystrom-tied", "lora-rslora"}
        with pytest.raises(NotFound) as err:
            admin.unload_adapter("nobody")
        assert err.value.reason == "not_found"  # nlora-reason, as HTTP's unload answers the code
        admin.unload_adapter("lora-rslora")
        admin.load_adapter("lora-rslora")
        admin.upload_adapter("inttune-nystrom-tied", CASES / "inttune-nystrom-tied")  # its current content: v1 answered
    # a change done names where its call came from too, as the refusals and the request log do
    said = [re.sub(r"\(\d+ ms\)$", "(N ms)", re.sub(r" from 127\.0\.0\.1:\d+([ :])", r" from 127.0.0.1:PORT\1",
                                                     r.getMessage())) for r in caplog.records]
    assert said == ["UnloadAdapter by 'ops' from 127.0.0.1:PORT refused (NOT_FOUND): adapter 'nobody' is not "
                    "registered",
                    "UnloadAdapter by 'ops' from 127.0.0.1:PORT: adapter 'lora-rslora' v1 unloaded (0 requests aborted, "
                    "0 draining) (N ms)",
                    "LoadAdapter by 'ops' from 127.0.0.1:PORT: adapter 'lora-rslora' v2 serving (lora, rank 16) (N ms)",
                    "UploadAdapter by 'ops' from 127.0.0.1:PORT: adapter 'inttune-nystrom-tied' v1 serving "
                    "(inttune-tied, rank 8) (N ms)"]
    entries = [json.loads(JsonFormatter().format(r)) for r in caplog.records]  # serve --log-format json
    assert [(e["event"], e["operation"], e["caller"], e.get("adapter"), e.get("adapter_version")) for e in entries] == [
        ("admin_refused", "UnloadAdapter", "ops", None, None), ("admin_done", "UnloadAdapter", "ops", "lora-rslora", 1),
        ("admin_done", "LoadAdapter", "ops", "lora-rslora", 2),
        ("admin_done", "UploadAdapter", "ops", "inttune-nystrom-tied", 1)]
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", e["client"]) for e in entries), entries
    assert all(e["duration_ms"] >= 0 for e in entries[1:])


def test_list_adapters_shows_only_the_callers_grants(server):
    with NloraClient(server.target, api_key=TENANT_KEYS["tied-co"]) as client:
        adapters, base_allowed = client.list_adapters()
    assert [a.name for a in adapters] == ["inttune-nystrom-tied"] and not base_allowed
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"]) as client:
        assert client.list_adapters() == ([], True)


def test_server_info_names_the_base_model_only_to_callers_granted_it(server):
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"]) as client:
        full = client.server_info()
    with NloraClient(server.target, api_key=TENANT_KEYS["tied-co"]) as client:  # base_model false
        hidden = client.server_info()
    assert full.model == "SmolLM2-135M-Instruct.Q4_1" and len(full.model_fingerprint) > 0
    assert (hidden.model, hidden.model_fingerprint) == ("", "")
    assert (hidden.max_rank, hidden.max_model_len, hidden.dtype) == (full.max_rank, full.max_model_len, full.dtype)


def test_calls_without_a_valid_key_are_refused_before_their_request_is_read(server, parsed):
    """Round-four hostile review: four 200 MiB Generate requests with no key were received and
    parsed whole (+2.1 GB) before the servicer looked at the key. KeyFirst refuses on the metadata:
    the request is never parsed (the parser spy sees no call), and the refusal reads as before."""
    import grpc

    from nlora_serve.proto import nlora_pb2 as pb
    from nlora_serve.proto import nlora_pb2_grpc as pb_grpc

    big = pb.GenerateRequest(text="x" * (20 << 20), sampling=pb.SamplingParams(max_tokens=1))
    with grpc.insecure_channel(server.target) as channel:
        generation, admin = pb_grpc.GenerationStub(channel), pb_grpc.AdapterAdminStub(channel)
        for metadata, word in (((), "missing credentials"), ((("authorization", "Bearer nope"),), "unknown API key")):
            with pytest.raises(grpc.RpcError) as err:
                list(generation.Generate(big, metadata=metadata, timeout=60))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and word in err.value.details()
        tenant = (("authorization", f"Bearer {TENANT_KEYS['tied-co']}"),)
        swap = pb.SwapAdapterRequest(name="inttune-nystrom-tied", n_safetensors=b"\0" * (20 << 20))
        with pytest.raises(grpc.RpcError) as err:
            admin.SwapAdapter(swap, metadata=tenant, timeout=60)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "SwapAdapter needs an admin key; 'tied-co' is a tenant key"
        assert parsed == []  # none of the refused requests reached the parser
        small = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(max_tokens=1))
        assert list(generation.Generate(small, metadata=(("authorization", f"Bearer {ADMIN_KEY}"),), timeout=60))
    assert [method for method, _ in parsed] == ["/nlora_serve.v1.Generation/Generate"]


def test_key_first_hands_a_refused_call_a_handler_that_reads_nothing(tenants_file, caplog):
    """The refusal handler is a request-stream handler that never iterates its stream (grpc reads a
    streamed request's messages only as the handler asks), and nothing after KeyFirst runs."""
    import asyncio

    import grpc

    from nlora_serve.serving.grpc_api.auth import KeyFirst
    from nlora_serve.serving.metrics import ServerMetrics

    calls = []

    async def continuation(details):
        calls.append(details.method)
        return "next handler"

    class Details:
        def __init__(self, method, key=None):
            self.method = method
            self.invocation_metadata = (("authorization", f"Bearer {key}"),) if key else ()

    class Context:
        async def abort(self, code, message, trailing_metadata=()):
            raise RuntimeError((code, message, dict(trailing_metadata)))

        def peer(self):
            return "ipv4:192.0.2.5:40000"

    async def never_read():
        raise AssertionError("the request was read")
        yield  # an async generator

    auth = Authenticator.from_file(tenants_file)
    caplog.set_level(logging.INFO, logger="nlora_serve.requests")
    interceptor = KeyFirst(auth, ServerMetrics(lambda: {}, lambda: (0, 0), request_log=RequestLog()))
    cases = [("/nlora_serve.v1.Generation/Generate", None, grpc.StatusCode.UNAUTHENTICATED),
             ("/nlora_serve.v1.AdapterAdmin/SwapAdapter", TENANT_KEYS["lora-co"], grpc.StatusCode.PERMISSION_DENIED),
             ("/nlora_serve.v1.AdapterAdmin/UploadAdapter", "wrong", grpc.StatusCode.UNAUTHENTICATED),
             ("/nlora_serve.v1.Generation/Generate", "revoked-key", grpc.StatusCode.UNAUTHENTICATED)]
    for method, key, code in cases:
        handler = asyncio.run(interceptor.intercept_service(continuation, Details(method, key)))
        assert handler.request_streaming and handler.stream_stream is not None
        with pytest.raises(RuntimeError) as err:
            asyncio.run(handler.stream_stream(never_read(), Context()))
        assert err.value.args[0][0] == code
        assert err.value.args[0][2] == {"nlora-reason": code.name.lower()}  # the reason, as HTTP's error code
    assert calls == []
    # the refused Generate's request-log line names the address the call came from (context.peer())
    assert [r.getMessage() for r in caplog.records if r.name == "nlora_serve.requests"] == [
        "request refused: frontend=grpc client=192.0.2.5:40000 tenant=- reason=unauthenticated "
        "message=" + repr("missing credentials: send 'authorization: Bearer <key>' (an HTTP header or gRPC metadata)"),
        # an unknown key is named by its id (a revoked key a client still sends: its old entry's hash starts so)
        f"request refused: frontend=grpc client=192.0.2.5:40000 tenant=- key={hash_key('revoked-key')[:8]} "
        "reason=unauthenticated message='unknown API key'"]
    for method, key in (("/nlora_serve.v1.Generation/Generate", TENANT_KEYS["lora-co"]),
                        ("/nlora_serve.v1.AdapterAdmin/SwapAdapter", ADMIN_KEY),
                        ("/grpc.health.v1.Health/Check", None)):  # health needs no key
        assert asyncio.run(interceptor.intercept_service(continuation, Details(method, key))) == "next handler"
    assert len(calls) == 3


def test_an_admins_refusals_are_logged_each_a_tenant_keys_at_most_once_per_interval(caplog):
    refusals = AdminRefusals(logging.getLogger("test.admin_log"))
    caplog.set_level(logging.INFO, logger="test.admin_log")
    tenant, admin = Principal("acme", False), Principal("ops", True)
    for _ in range(3):  # a tenant's tooling in a loop: one line, the rest counted in the next one
        refusals.refused("SwapAdapter", tenant, "PERMISSION_DENIED", AuthPermissionDenied("SwapAdapter needs an admin key"))
    for version in (1, 2, 3):  # an operator's refused changes: each one
        refusals.refused("SwapAdapter", admin, "FAILED_PRECONDITION", NloraError(f"expected v{version}"))
    # with the address the call came from (gRPC's context.peer(), HTTP's request.client)
    refusals.refused("SwapAdapter", admin, "NOT_FOUND", NloraError("no 'x'"), "ipv6:[::1]:40000")
    refusals.refused("/v1/unload_lora_adapter", admin, "404", NloraError("no 'x'"), ("10.0.0.7", 51234))
    assert [r.getMessage() for r in caplog.records] == [
        "SwapAdapter by tenant 'acme' refused (PERMISSION_DENIED): SwapAdapter needs an admin key",
        *(f"SwapAdapter by 'ops' refused (FAILED_PRECONDITION): expected v{v}" for v in (1, 2, 3)),
        "SwapAdapter by 'ops' from [::1]:40000 refused (NOT_FOUND): no 'x'",
        "/v1/unload_lora_adapter by 'ops' from 10.0.0.7:51234 refused (404): no 'x'"]
    # serve --log-format json: each value its own key
    entries = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    keys = ("event", "operation", "caller", "is_admin", "client", "status", "error")
    assert [tuple(e[k] for k in keys) for e in (entries[0], entries[4])] == [
        ("admin_refused", "SwapAdapter", "acme", False, None, "PERMISSION_DENIED", "SwapAdapter needs an admin key"),
        ("admin_refused", "SwapAdapter", "ops", True, "[::1]:40000", "NOT_FOUND", "no 'x'")]
