"""Prometheus metrics exist and move under load; health, reflection and graceful drain."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from nlora_serve.client import NloraClient, NotFound, Unavailable
from serving_check import CASES, TIED

PROMPT = [1, 9690, 198, 2683, 359, 253]
HISTOGRAMS = ("nlora_time_to_first_token_seconds", "nlora_inter_token_latency_seconds",
              "nlora_request_duration_seconds", "nlora_adapter_swap_seconds", "nlora_adapter_load_seconds")
GAUGES = ("nlora_requests_running", "nlora_requests_waiting", "nlora_kv_blocks_used", "nlora_adapters_resident",
          "nlora_adapter_bytes_resident")
COUNTERS = ("nlora_prompt_tokens_total", "nlora_generation_tokens_total", "nlora_requests_rejected_total")
GRPC, HTTP = (("frontend", "grpc"),), (("frontend", "http"),)  # the request metrics' label
REQUEST_METRICS = ("nlora_time_to_first_token_seconds", "nlora_inter_token_latency_seconds",
                   "nlora_request_duration_seconds")


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_exist_and_move_under_load(make_server):
    server = make_server(metrics_port=0, tenant_metrics=True)
    port = server.server.metrics_port
    before = _scrape(port)
    for name in HISTOGRAMS:
        for labels in (GRPC, HTTP) if name in REQUEST_METRICS else ((),):
            assert before[(f"{name}_count", labels)] == 0
    for name in GAUGES:
        assert before[(name, ())] == 0
    assert before[("nlora_requests_rejected_total", (("frontend", "grpc"), ("reason", "not_found")))] == 0
    assert before[("nlora_kv_blocks_total", ())] == 256  # the harness's CacheConfig(num_blocks=256): used / total
    assert not [key for key in before if key[0].startswith("nlora_tenant_")]  # a tenant's series: at its first request
    with NloraClient(server.target, timeout=60) as client:
        tied = client.upload_adapter(TIED, CASES / TIED)
        stream = client.generate(PROMPT, adapter=TIED, max_tokens=50, ignore_eos=True)
        next(stream)
        during = _scrape(port)
        stream.close()
        deltas = [client.complete(PROMPT, max_tokens=5, min_tokens=5)[1] for _ in range(2)]
        with pytest.raises(NotFound):
            list(client.generate(PROMPT, adapter="nobody"))
        stored = server.engine.adapters.registry.get(TIED).path / "adapter_model.safetensors"
        client.swap_adapter(TIED, stored.read_bytes())
    after = _scrape(port)
    assert during[("nlora_requests_running", ())] == 1 and during[("nlora_kv_blocks_used", ())] >= 1
    assert after[("nlora_adapters_resident", ())] == 1
    assert after[("nlora_adapter_bytes_resident", ())] == 30 * 3 * 8 * 8 * 4 == tied.resident_bytes  # N, fp32
    assert after[("nlora_time_to_first_token_seconds_count", GRPC)] == 3  # the cancelled stream had its first token
    assert after[("nlora_request_duration_seconds_count", GRPC)] == 2  # finished streams only
    # counted at a request's first token, as vLLM's: the running stream's prompt while it runs, and
    # the cancelled one's, which was prefilled, stays counted
    assert during[("nlora_prompt_tokens_total", GRPC)] == len(PROMPT)
    assert after[("nlora_prompt_tokens_total", GRPC)] == 3 * len(PROMPT)
    streamed = 1 + sum(len(d.token_ids) for ds in deltas for d in ds)
    assert after[("nlora_generation_tokens_total", GRPC)] >= streamed  # plus any the cancelled one got
    assert after[("nlora_inter_token_latency_seconds_count", GRPC)] >= 2 * 4
    assert after[("nlora_requests_rejected_total", (("frontend", "grpc"), ("reason", "not_found")))] == 1
    assert after[("nlora_time_to_first_token_seconds_count", HTTP)] == 0  # nothing came in over HTTP
    assert after[("nlora_requests_rejected_total", (("frontend", "http"), ("reason", "not_found")))] == 0
    assert after[("nlora_adapter_swap_seconds_count", ())] == 1
    assert after[("nlora_adapter_load_seconds_count", ())] == 1
    assert after[("nlora_kv_blocks_used", ())] == 0 and after[("nlora_requests_running", ())] == 0
    assert during[("nlora_kv_blocks_total", ())] == after[("nlora_kv_blocks_total", ())] == 256
    # without a tenants file every request is the one tenant "anonymous": 2 finished, the closed
    # stream cancelled, the unknown adapter rejected; its tokens are every token streamed
    tenant = {labels: value for (name, labels), value in after.items() if name == "nlora_tenant_requests_total"}
    assert tenant == {(("outcome", outcome), ("tenant", "anonymous")): count
                      for outcome, count in (("finished", 2), ("cancelled", 1), ("rejected", 1))}
    assert after[("nlora_tenant_generation_tokens_total", (("tenant", "anonymous"),))] == \
        after[("nlora_generation_tokens_total", GRPC)]
    # its latencies: the front end's observations (one tenant, one front end here), at the same points
    anonymous = (("tenant", "anonymous"),)
    for name in ("time_to_first_token_seconds", "request_duration_seconds"):
        for suffix in ("count", "sum"):
            assert after[(f"nlora_tenant_{name}_{suffix}", anonymous)] == after[(f"nlora_{name}_{suffix}", GRPC)]
    # per finished request with tokens after its first delta's (the two 5-token ones)
    assert after[("nlora_tenant_request_time_per_output_token_seconds_count", anonymous)] == 2


def test_preemptions_counter_moves_when_the_kv_cache_runs_short(make_server):
    # 64 KV blocks of 16 tokens (max_model_len 1024): a request of 500 + 40 tokens needs 34 and
    # runs alone unpreempted; two running at once need 68, so one is preempted before both finish
    server = make_server(metrics_port=0, num_blocks=64)
    port = server.server.metrics_port
    prompts = [list(range(start, start + 500)) for start in (1000, 2000, 3000)]  # no shared prefix
    assert _scrape(port)[("nlora_num_preemptions_total", ())] == 0
    with NloraClient(server.target, timeout=120) as client:
        client.complete(prompts[0], max_tokens=40, ignore_eos=True)
        assert _scrape(port)[("nlora_num_preemptions_total", ())] == 0
        streams = [client.generate(prompt, max_tokens=40, ignore_eos=True) for prompt in prompts[1:]]
        heads = [next(stream) for stream in streams]  # both admitted and running
        got = [sum(len(d.token_ids) for d in [head, *stream]) for head, stream in zip(heads, streams)]
    assert got == [40, 40]
    preempted = _scrape(port)[("nlora_num_preemptions_total", ())]
    assert preempted >= 1 and preempted == server.engine.stats()["preemptions"]


def test_health_and_reflection(make_server):
    server = make_server()
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nlora_serve.v1.Generation", "nlora_serve.v1.AdapterAdmin"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"nlora_serve.v1.Generation", "nlora_serve.v1.AdapterAdmin", "grpc.health.v1.Health"} <= names


def test_graceful_drain_finishes_running_streams_and_refuses_new_ones(make_server):
    server = make_server()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.target))
    with NloraClient(server.target, timeout=60) as client:
        stream = client.generate(PROMPT, max_tokens=12, min_tokens=12)
        got = [next(stream)]
        drain = asyncio.run_coroutine_threadsafe(server.server.shutdown(grace=60), server.loop)
        while not server.server.admission.draining:
            pass
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(Unavailable, match="shutting down"):
            list(client.generate(PROMPT, max_tokens=2))
        got += list(stream)
    assert drain.result(60) is True  # every stream finished inside the grace period
    assert got[-1].finish_reason == "length" and sum(len(d.token_ids) for d in got) == 12
    assert server.engine.stats()["kv_blocks_used"] == 0
