"""``serve --backend vllm``: our gRPC front end (auth, registry, hot-swap) on vLLM's AsyncLLM.

Two tenants from the shared cases (a tied IntTune tenant and an rsLoRA), uploaded through the
admin API, folded to plain LoRA and served by vLLM in float32 on the CPU beside base-model
requests: greedy tokens equal the cases' recorded transformers references (cases README rule).
Runs only where vllm is importable (see conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from admission_harness import wait_for
from grpc_harness import ADMIN_KEY, TENANT_KEYS, RunningServer, matches_reference
from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.client import AsyncNloraClient, NloraClient
from nlora_serve.client.types import NotFound
from nlora_serve.serving.auth import Authenticator
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server_config import ServerConfig

CASES = Path(__file__).parents[1] / "data" / "cases"
TENANTS = {"inttune-nystrom-tied": "tied-co", "lora-rslora": "lora-co"}


def _refs(name: str | None) -> list[dict]:
    path = CASES / "BASE_GREEDY.json" if name is None else CASES / name / "case.json"
    return json.loads(path.read_text())["references"]


@pytest.fixture(scope="module")
def server(base_fp32, tenants_file, tmp_path_factory):
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    config = EngineConfig(dtype=torch.float32, adapter_dir=str(tmp_path_factory.mktemp("store")),
                          scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=512),
                          adapter_limits=AdapterLimits(max_rank=16))
    engine = VllmEngine(config, VllmBackendConfig(max_loras=2), base_fp32)
    serve_config = ServerConfig(port=0, tenants_file=str(tenants_file))
    running = RunningServer(engine, serve_config, Authenticator.from_file(tenants_file),
                            server_info(base_fp32, config, serve_config, backend="vllm"), base_fp32.tokenizer())
    yield running
    running.stop()
    engine.shutdown()


async def _stream_all(target: str, jobs: list[tuple[str | None, str, dict]]):
    """Every job concurrently (one mixed batch), each with its own tenant's key."""
    async def one(adapter, key, ref):
        async with AsyncNloraClient(target, api_key=key, timeout=300) as client:
            n = len(ref["greedy_token_ids"])
            return [d async for d in client.generate(ref["prompt_token_ids"], adapter=adapter,
                                                     max_tokens=n, min_tokens=n)]
    return await asyncio.gather(*(one(*job) for job in jobs))


def _check(jobs, results, uploaded) -> None:
    for (adapter, _, ref), deltas in zip(jobs, results):
        tokens = [t for d in deltas for t in d.token_ids]
        assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"]), \
            f"{adapter}: got {tokens}, want {ref['greedy_token_ids']}"
        want = uploaded[adapter] if adapter else None
        assert {(d.adapter, d.adapter_version, d.content_hash) for d in deltas} == \
            {(want.name, want.version, want.content_hash) if want else ("", 0, "")}
        last = deltas[-1]
        assert last.finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
        assert last.usage.prompt_tokens == len(ref["prompt_token_ids"])
        assert last.usage.completion_tokens == len(ref["greedy_token_ids"])


def test_two_uploaded_tenants_and_the_base_match_the_references(server):
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        assert admin.server_info().backend == "vllm"
        uploaded = {name: admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10) for name in TENANTS}
    assert uploaded["inttune-nystrom-tied"].tied and not uploaded["lora-rslora"].tied
    jobs = [(None, TENANT_KEYS["base-co"], ref) for ref in _refs(None)]
    jobs += [(name, TENANT_KEYS[tenant], ref) for name, tenant in TENANTS.items() for ref in _refs(name)]
    _check(jobs, asyncio.run(_stream_all(server.target, jobs)), uploaded)
    stats = server.engine.stats()
    assert stats["running"] == 0 and stats["generation_tokens"] >= sum(len(r["greedy_token_ids"]) for *_, r in jobs)


def test_hot_swap_is_a_new_vllm_lora_id_and_never_reuses_the_old_weights(server):
    """Swap the tied tenant's N to zero (its outputs must become the base model's: the base
    references), then back to the original N (the case's references again): each swap is a new
    version with a new vLLM LoRA id, and no request runs on a stale cached LoRA."""
    name = "inttune-nystrom-tied"
    registry = server.engine.adapters.registry
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        if name not in {a.name for a in admin.list_adapters()[0]}:
            admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10)
        n = safetensors.torch.load_file(registry.get(name).path / "adapter_model.safetensors")
        first = registry.get(name).slot
        zero = admin.swap_adapter(name, safetensors.torch.save({k: torch.zeros_like(t) for k, t in n.items()}))
    zero_id = registry.get(name).slot
    jobs = [(name, TENANT_KEYS["tied-co"], ref) for ref in _refs(None)]
    _check(jobs, asyncio.run(_stream_all(server.target, jobs)), {name: zero})
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        back = admin.swap_adapter(name, safetensors.torch.save(n))
    assert len({first, zero_id, registry.get(name).slot}) == 3 and back.version == zero.version + 1
    # freed: its folded LoRA goes once vLLM has dropped it (remove_lora, then the folder)
    assert wait_for(lambda: not server.engine.adapters.residency.path(first).exists())
    jobs = [(name, TENANT_KEYS["tied-co"], ref) for ref in _refs(name)]
    _check(jobs, asyncio.run(_stream_all(server.target, jobs)), {name: back})


def test_unknown_adapter_is_not_found_and_never_the_base_model(server):
    async def go():
        async with AsyncNloraClient(server.target, api_key=TENANT_KEYS["tied-co"], timeout=60) as client:
            return [d async for d in client.generate([1, 2, 3], adapter="inttune-missing", max_tokens=2)]
    with pytest.raises(NotFound, match="inttune-missing"):
        asyncio.run(go())


def test_a_stream_closed_mid_decode_aborts_in_vllm_and_releases_its_pin(server):
    name = "lora-rslora"
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        if name not in {a.name for a in admin.list_adapters()[0]}:
            admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10)

    async def go():
        async with AsyncNloraClient(server.target, api_key=TENANT_KEYS["lora-co"], timeout=60) as client:
            seen = 0
            async for d in client.generate([1, 9690, 198, 2683], adapter=name, max_tokens=400, ignore_eos=True):
                seen += len(d.token_ids)
                if seen >= 2:
                    break
        for _ in range(100):  # the server notices the cancel, then vLLM's abort comes back
            if not server.engine._jobs:
                return
            await asyncio.sleep(0.05)
    asyncio.run(go())
    assert not server.engine._jobs and server.engine.adapters.registry.get(name).refcount == 0


def test_swaps_racing_cancelled_requests_leave_vllm_serving(server):
    """A hot-swap while the tenant's requests are dropped at once: a superseded version's folder was
    deleted while vLLM could still load it, which killed vLLM's engine core for every tenant (after
    ~60 s of a tester's 4-client churn). A smoke test of the served path: the order that prevents
    it is pinned deterministically in tests/engine/test_vllm_engine_paths.py."""
    name = "inttune-nystrom-tied"
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        if name not in {a.name for a in admin.list_adapters()[0]}:
            admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10)
    n = safetensors.torch.load_file(server.engine.adapters.registry.get(name).path / "adapter_model.safetensors")
    weights, doubled = safetensors.torch.save(n), safetensors.torch.save({k: 2 * t for k, t in n.items()})

    async def churn(seconds: float):
        async def drop_after_first():
            async with AsyncNloraClient(server.target, api_key=TENANT_KEYS["tied-co"], timeout=60) as client:
                async for _ in client.generate([1, 9690, 198], adapter=name, max_tokens=50, ignore_eos=True):
                    break
        async with AsyncNloraClient(server.target, api_key=ADMIN_KEY, timeout=60) as admin:
            end, n = time.monotonic() + seconds, 0
            while time.monotonic() < end:
                await asyncio.gather(drop_after_first(), drop_after_first(), admin.swap_adapter(
                    name, doubled if n % 2 else weights))
                n += 1
            return n
    assert asyncio.run(churn(15.0)) > 5
    assert server.engine.dead_reason is None
    jobs = [(name, TENANT_KEYS["tied-co"], ref) for ref in _refs(name)[:1]]
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:  # end on the case's own weights
        admin.swap_adapter(name, weights)
    results = asyncio.run(_stream_all(server.target, jobs))
    tokens = [t for d in results[0] for t in d.token_ids]
    assert matches_reference(tokens, jobs[0][2]["greedy_token_ids"], jobs[0][2]["top2_logit_margins"])


def test_a_repeated_prompt_reports_the_tokens_vllm_found_in_its_prefix_cache(server):
    block = server.engine._llm.vllm_config.cache_config.block_size
    prompt = [1] + [(7 * i) % 2000 + 100 for i in range(2 * block + 3)]

    async def usage():
        async with AsyncNloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=120) as client:
            return [d async for d in client.generate(prompt, max_tokens=2)][-1].usage
    first, second = asyncio.run(usage()), asyncio.run(usage())
    assert first.cached_tokens == 0 and second.cached_tokens >= 2 * block  # was always 0


def _gauges(server) -> dict[str, float]:
    """The server's ``nlora_*`` gauges as a scrape of /metrics reads them."""
    body, _ = server.server.metrics.exposition()
    return {name: float(value) for name, value in
            (line.split() for line in body.decode().splitlines() if line.startswith("nlora_") and "{" not in line)}


def _upload_missing(server, names) -> None:
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        have = {a.name for a in admin.list_adapters()[0]}
        for name in set(names) - have:
            admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10)


def test_a_request_waiting_for_a_lora_slot_counts_as_waiting(server):
    """One distinct adapter more than --max-loras: vLLM defers the extra request (it counts it apart,
    as num_skipped_waiting_reqs), and nlora_requests_waiting read 0 while it waited. Never more than
    --max-loras adapters run at once (on the CPU 3 ran under --max-loras 2: the zero LoRA of base
    requests had a vLLM slot of its own). References: the fixture's --max-loras, the streams this
    test opened and that have not finished."""
    names = ["inttune-nystrom-tied", "lora-rslora", "lora-peft-all-modules"]
    slots = 2  # the fixture's --max-loras
    _upload_missing(server, names)

    async def go():
        async with AsyncNloraClient(server.target, api_key=ADMIN_KEY, timeout=300) as client:
            async def one(name):
                async for _ in client.generate([1, 9690, 198, 2683], adapter=name, max_tokens=400, ignore_eos=True):
                    pass
            tasks = [asyncio.create_task(one(name)) for name in names]
            seen = set()
            for _ in range(400):  # up to 20 s: vLLM reports its scheduler's counts once per step
                await asyncio.sleep(0.05)
                if any(t.done() for t in tasks):
                    break
                gauges = _gauges(server)
                seen.add((gauges["nlora_requests_running"], gauges["nlora_requests_waiting"]))
                if (slots, 1) in seen:
                    break
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return seen
    seen = asyncio.run(go())
    assert (slots, 1) in seen, f"(running, waiting) seen: {sorted(seen)}"
    assert max(running for running, _ in seen) == slots, f"(running, waiting) seen: {sorted(seen)}"


def test_adapters_resident_are_the_ones_vllm_holds(server):
    """Every version has its vLLM LoRA id from registration on, and nlora_adapters_resident counted
    them all (and AdapterInfo.resident_bytes gave each its folded bytes), while vLLM loads a LoRA
    on its first request and holds max_cpu_loras at most (--max-loras unless given; on the CPU it
    held one more while no base request ran). References: vLLM's LoRA cache (list_loras), the
    fixture's --max-loras, a version no request has used, the last one used."""
    names = ["inttune-nystrom-tied", "lora-rslora", "lora-peft-all-modules", "lora-layers-subset"]
    _upload_missing(server, names)
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        unused = admin.upload_adapter("lora-regex-targets", CASES / "lora-regex-targets", chunk_bytes=64 << 10)
        assert unused.resident_bytes == 0  # no request has asked vLLM for it
        for name in names:  # one after another: the last one used stays in vLLM's LRU cache
            admin.complete([1, 9690, 198], adapter=name, max_tokens=2)
    engine = server.engine
    capacity = engine._llm.vllm_config.lora_config.max_cpu_loras
    assert capacity == 2  # the fixture's --max-loras
    current = {v.name: v for v in engine.adapters.versions()}
    assert len(current) > capacity

    def agrees() -> bool:
        held = engine._call(engine._llm.list_loras(), timeout=60)
        resident = [v for v in current.values() if v.slot in held]
        gauges = _gauges(server)
        with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
            listed = {a.name: a.resident_bytes for a in admin.list_adapters()[0]}
        return (gauges["nlora_adapters_resident"] == len(resident)
                and gauges["nlora_adapter_bytes_resident"] == sum(v.held_bytes for v in resident)
                and listed == {name: v.held_bytes if v in resident else 0 for name, v in current.items()})
    assert wait_for(agrees)
    gauges = _gauges(server)
    assert 1 <= gauges["nlora_adapters_resident"] <= capacity
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        listed = {a.name: a.resident_bytes for a in admin.list_adapters()[0]}
    assert listed["lora-regex-targets"] == 0 and listed[names[-1]] == current[names[-1]].held_bytes > 0


def test_prompt_logprobs_pass_through_to_vllm(server, hf_model):
    """SamplingParams.prompt_logprobs reaches vLLM, and its answer comes back in our shape: on the
    base model and a tied tenant (served folded), against transformers' float64 log_softmax."""
    import sys

    from nlora_serve.engine.sample.sampling import SamplingParams

    sys.path.insert(0, str(Path(__file__).parents[1] / "adapters"))
    from adapter_helpers import file_deltas, merged

    _upload_missing(server, ["inttune-nystrom-tied"])
    ids = _refs(None)[0]["prompt_token_ids"]

    async def scored(adapter):
        stream = server.engine.add_request(ids, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2),
                                           adapter=adapter)
        deltas = [d async for d in stream]
        assert sum(d.prompt_logprobs is not None for d in deltas) == 1  # handed out once
        return next(d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None)

    for adapter in (None, "inttune-nystrom-tied"):
        got = asyncio.run(scored(adapter))
        deltas, biases = file_deltas(CASES / adapter) if adapter else ({}, {})
        with merged(hf_model, deltas, biases), torch.inference_mode():
            want = hf_model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        assert len(got) == len(ids) and got[0] is None
        for p in range(1, len(ids)):
            entry, row = got[p], want[p - 1]
            assert list(entry.logprobs)[0] == ids[p]
            assert entry.logprobs[ids[p]] == pytest.approx(float(row[ids[p]]), abs=1e-3), (adapter, p)
            top = row.topk(2)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert entry.logprobs[t] == pytest.approx(v, abs=1e-3), (adapter, p)
            assert 1 + int((row > row[ids[p]] + 1e-3).sum()) <= entry.rank <= 1 + int((row > row[ids[p]] - 1e-3).sum())


def test_max_tokens_over_the_context_is_lowered_before_vllm(server):
    """Our pre-check no longer refuses prompt + max_tokens over max_model_len (500 + 100 > 512): the
    request runs with max_tokens lowered to the 12 tokens left, as vLLM 0.32's server lowers it, the
    greedy tokens of the request that leaves max_tokens unset (gRPC 0: the rest of the context)."""
    prompt = [1] + [(7 * i) % 2000 + 100 for i in range(499)]
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=120) as client:
        over, unset = ([d for d in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, temperature=0.0)]
                       for max_tokens in (100, 0))
    for deltas in (over, unset):
        assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 512 - 500
    assert [t for d in over for t in d.token_ids] == [t for d in unset for t in d.token_ids]
