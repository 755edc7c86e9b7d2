"""``bench --keys-file``: each request sends its tenant's key (gRPC metadata, HTTP header), the
rest ``--api-key``; a file that leaves a request without a key, or is malformed, is refused before
any request, naming what is wrong and never a key."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from nlora_serve.client.bench.keys import read_keys_file
from nlora_serve.client.bench.runner import LoadShape, run_load
from nlora_serve.client.bench.targets import GrpcTarget
from nlora_serve.client.bench.workload import LengthDist, TenantMix, Workload, WorkloadConfig
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc

KEYS = {"acme": "key-acme", "globex": "key-globex"}


class Recorder(pb_grpc.GenerationServicer):
    """Generate records (adapter, authorization) and answers an empty stream."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []

    def Generate(self, request, context):
        auth = dict(context.invocation_metadata()).get("authorization")
        self.seen.append((request.adapter, auth))
        return iter(())


def test_grpc_requests_send_their_tenants_key_and_the_others_the_api_key():
    recorder, server = Recorder(), grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_GenerationServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    workload = Workload(WorkloadConfig(tenants=TenantMix(("acme", "globex", "initech"), "round-robin"),
                                       prompt_len=LengthDist(3, 3), output_len=LengthDist(2, 2)))

    async def go():
        async with GrpcTarget(f"127.0.0.1:{port}", "key-default", keys=KEYS) as target:
            return await run_load(workload, target, LoadShape("closed", 2, num_requests=6), False)
    try:
        run = asyncio.run(go())
    finally:
        server.stop(None)
    assert all(r.ok for r in run.results), [r.error_message for r in run.results]
    assert sorted(recorder.seen) == sorted([("acme", "Bearer key-acme"), ("globex", "Bearer key-globex"),
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
