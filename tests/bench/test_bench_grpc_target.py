"""The bench's gRPC target against a fake servicer (no engine): ``--keys-file``, each request
sending its tenant's key, the rest ``--api-key``; a refusal's code with the server's reason. And the
keys file's own checks: malformed, it is refused before any request, naming what and never a key."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from nlora_serve.client.bench.keys import read_keys_file
from nlora_serve.client.bench.runner import LoadShape, run_load
from nlora_serve.client.bench.targets import GrpcTarget
from nlora_serve.client.bench.workload import LengthDist, TenantMix, Workload, WorkloadConfig
from nlora_serve.proto import REASON_KEY
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc

KEYS = {"acme": "key-acme", "globex": "key-globex"}


# adapter -> (status, reason) the fake refuses it with, as our server's Generate does
REFUSED = {"busy": (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"),
           "capped": (grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant_quota"),
           "ghost": (grpc.StatusCode.NOT_FOUND, "not_found"), "old": (grpc.StatusCode.NOT_FOUND, None)}


class Recorder(pb_grpc.GenerationServicer):
    """Generate records (adapter, authorization) and answers an empty stream, or refuses the
    adapters of REFUSED."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []

    def Generate(self, request, context):
        auth = dict(context.invocation_metadata()).get("authorization")
        self.seen.append((request.adapter, auth))
        if request.adapter in REFUSED:
            code, reason = REFUSED[request.adapter]
            context.abort_with_status(_Status(code, f"no {request.adapter}", ((REASON_KEY, reason),) if reason else ()))
        return iter(())


class _Status(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def _bench(names: tuple[str, ...], count: int, **target):
    """(run, what the fake saw) of ``count`` round-robin requests on ``names``."""
    recorder, server = Recorder(), grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_GenerationServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    workload = Workload(WorkloadConfig(tenants=TenantMix(names, "round-robin"), prompt_len=LengthDist(3, 3),
                                       output_len=LengthDist(2, 2)))

    async def go():
        async with GrpcTarget(f"127.0.0.1:{port}", **target) as t:
            return await run_load(workload, t, LoadShape("closed", 2, num_requests=count), False)
    try:
        return asyncio.run(go()), recorder.seen
    finally:
        server.stop(None)


def test_a_refusal_s_code_carries_the_server_s_reason_where_it_says_more():
    # helper-99's find: "RESOURCE_EXHAUSTED × 26" did not say whether the queue or a tenant quota refused
    run, _ = _bench(tuple(REFUSED), 4)
    assert {r.tenant: r.error for r in run.results} == {
        "busy": "RESOURCE_EXHAUSTED queue_full", "capped": "RESOURCE_EXHAUSTED tenant_quota",
        "ghost": "NOT_FOUND", "old": "NOT_FOUND"}  # not_found repeats the code; an older server sends none
    assert run.stopped is None


def test_grpc_requests_send_their_tenants_key_and_the_others_the_api_key():
    run, seen = _bench(("acme", "globex", "initech"), 6, api_key="key-default", keys=KEYS)
    assert all(r.ok for r in run.results), [r.error_message for r in run.results]
    assert sorted(seen) == sorted([("acme", "Bearer key-acme"), ("globex", "Bearer key-globex"),
                                            ("initech", "Bearer key-default")] * 2)


@pytest.mark.parametrize("text, why", [
    ("{", "not JSON"), ('["key-acme"]', "expected an object of tenant name -> API key, got a JSON list"),
    ('{"acme": ""}', "the key of tenant 'acme' must be a non-empty string"),
    ('{"acme": 7}', "the key of tenant 'acme' must be a non-empty string"),
    ('{"acme": "key-\\nacme"}', "tenant 'acme': API key must be printable ASCII"),
])
def test_a_malformed_keys_file_is_refused_naming_what_and_never_the_key(tmp_path, text, why):
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        read_keys_file(path)
    assert str(err.value).startswith(f"--keys-file {path}: ") and why in str(err.value)
    assert "key-" not in str(err.value).replace("--keys-file", "")
