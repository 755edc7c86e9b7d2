"""The vLLM backend writes a version's fold folder on its first request, not on registration, and
keeps at most ``max_fold_folders`` folders of idle versions on disk (here 1).

References: the fold folder's tree on disk, and the tied IntTune case's recorded transformers greedy
tokens (their first steps: tiny max_tokens), before and after a folder is removed and folded again.
Runs only where vllm is importable (see conftest.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from admission_harness import wait_for
from grpc_harness import matches_reference
from nlora_serve.adapters.manager import AdapterLimits
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.engine.sampling import SamplingParams

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


def test_a_folder_stays_while_its_version_has_a_request_in_flight(engine):
    long_name, others = NAMES[2], NAMES[3:6]

    async def go():
        stream = engine.add_request([1, 9690, 198, 2683], SamplingParams(max_tokens=200, ignore_eos=True),
                                    adapter=long_name)
        seen = 0
        async for out in stream:  # its first tokens: it runs in vLLM
            seen += len(out.token_ids)
            if seen >= 2:
                break
        for name in others:  # each over the bound: idle folders go, the running one stays
            tokens = await asyncio.to_thread(_greedy, engine, name, REF)
            assert _matches(tokens, REF)
            assert long_name in _folded(engine)
        async for out in stream:  # it still streams on its version
            seen += len(out.token_ids)
            if seen >= 8:
                break
        await stream.aclose()
    asyncio.run(go())
    # ended: its folder is idle now and, beyond the bound, goes at the next request's trim
    assert _matches(_greedy(engine, NAMES[6], REF), REF)
    assert wait_for(lambda: long_name not in _folded(engine), within=20.0)
    assert engine.dead_reason is None
