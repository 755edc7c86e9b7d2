"""The vLLM backend writes a version's fold folder on its first request, not on registration, and
keeps at most ``max_fold_folders`` folders on disk (here 1), in use or idle.

References: the fold folder's tree on disk, and the tied IntTune case's recorded transformers greedy
tokens (their first steps: tiny max_tokens), before and after a folder is removed and folded again.
Runs only where vllm is importable (see conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from admission_harness import wait_for
from grpc_harness import matches_reference
from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.engine.sample.sampling import SamplingParams

CASE = Path(__file__).parents[1] / "data" / "cases" / "inttune-nystrom-tied"
STEPS = 8  # greedy tokens compared per request (the base model's differ from the 6th)
NAMES = [f"tied-{i}" for i in range(12)]


@pytest.fixture(scope="module")
def engine(base_fp32, tmp_path_factory):
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    config = EngineConfig(dtype=torch.float32, adapter_dir=str(tmp_path_factory.mktemp("store")),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256),
                          adapter_limits=AdapterLimits(max_rank=16))
    engine = VllmEngine(config, VllmBackendConfig(max_loras=2, max_fold_folders=1), base_fp32)
    yield engine
    engine.shutdown()


def _folded(engine) -> set[str]:
    """Names whose current version has its fold folder on disk."""
    residency = engine.adapters.residency
    return {v.name for v in engine.adapters.versions() if residency.path(v.slot).is_dir()}


def _greedy(engine, name: str, ref: dict) -> list[int]:
    async def go():
        greedy = SamplingParams(max_tokens=STEPS, min_tokens=STEPS, temperature=0.0)
        stream = engine.add_request(ref["prompt_token_ids"], greedy, adapter=name)
        return [t async for out in stream for t in out.token_ids]
    return asyncio.run(go())


def _matches(tokens: list[int], ref: dict) -> bool:
    return matches_reference(tokens, ref["greedy_token_ids"][:STEPS], ref["top2_logit_margins"][:STEPS])


REF = json.loads((CASE / "case.json").read_text())["references"][0]


def test_registering_many_tenants_writes_no_fold_folder_and_the_first_request_folds_one(engine):
    for name in NAMES:
        engine.adapters.register_dir(name, CASE)
    assert _folded(engine) == set()
    tokens = _greedy(engine, NAMES[0], REF)
    assert _matches(tokens, REF), f"got {tokens}, want {REF['greedy_token_ids'][:STEPS]}"
    assert _folded(engine) == {NAMES[0]}


def test_beyond_the_bound_idle_folders_go_and_are_folded_again_with_the_same_tokens(engine):
    first = _greedy(engine, NAMES[0], REF)
    assert _matches(first, REF)
    assert _matches(_greedy(engine, NAMES[1], REF), REF)
    assert wait_for(lambda: _folded(engine) == {NAMES[1]}, within=20.0)  # NAMES[0] was idle: removed
    again = _greedy(engine, NAMES[0], REF)  # folded again on demand
    assert again == first and wait_for(lambda: _folded(engine) == {NAMES[0]}, within=20.0)
    assert engine.dead_reason is None


def _on_disk(engine) -> int:
    """Fold folders of adapter versions on disk now (the CPU's zero LoRA of base requests aside)."""
    zero = str(engine._base_lora.lora_int_id) if engine._base_lora is not None else None
    return sum(1 for p in engine.adapters.residency.root.iterdir() if p.is_dir() and p.name != zero)


def test_the_bound_holds_while_a_request_runs_and_its_tenant_is_swapped(engine):
    """--max-fold-folders 1 while a long request runs: a request of another tenant and one of the
    running tenant's hot-swapped version wait for room, counted as waiting, and run once the long
    request ends (a second folder was written at once, one more per version in flight). References:
    the fold folder's tree sampled throughout, the case's recorded greedy tokens."""
    long_name, other = NAMES[2], NAMES[3]
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(_on_disk(engine))
            time.sleep(0.002)

    async def go():
        stream = engine.add_request([1, 9690, 198, 2683], SamplingParams(max_tokens=200, ignore_eos=True),
                                    adapter=long_name)
        made = 0
        async for out in stream:  # its first tokens: it runs in vLLM
            made += len(out.token_ids)
            if made >= 2:
                break
        engine.adapters.register_dir(long_name, CASE)  # a new version while the old one runs
        waiters = [asyncio.create_task(asyncio.to_thread(_greedy, engine, name, REF)) for name in (other, long_name)]
        waited = await asyncio.to_thread(wait_for, lambda: engine.stats()["waiting"] == 2, 20.0)
        assert waited and not any(w.done() for w in waiters) and _on_disk(engine) == 1
        await stream.aclose()  # its version, superseded, is freed: room for one, then the other
        return await asyncio.wait_for(asyncio.gather(*waiters), 120)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(go())
    finally:
        stop.set()
        watcher.join(5)
    assert all(_matches(tokens, REF) for tokens in results), results
    assert max(seen) == 1 and engine.stats()["waiting"] == 0 and engine.dead_reason is None
