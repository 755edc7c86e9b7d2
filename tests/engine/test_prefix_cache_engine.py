"""The engine with prefix caching on: same greedy tokens as transformers and as the cache off, for
the base model, tied and LoRA adapters in mixed batches, chunked prefill across cached blocks,
preemption; blocks never cross adapters or versions; each sequence's root key is hashed once."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import safetensors.torch

from greedy_rule import matches_reference
from nlora_serve.engine.scheduling import prefix_cache
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from test_model import hf_greedy

CASES = Path(__file__).parents[1] / "data" / "cases"
ADAPTERS = ["inttune-nystrom-tied", "lora-bias", "lora-peft-all-modules", "lora-rslora", "nlora-reference-format"]
GREEDY_24 = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)


def make(base, tmp_path, caching: bool, **sched) -> LLMEngine:
    sched = {"max_num_seqs": 6, "max_num_batched_tokens": 16, "max_model_len": 128, **sched}  # chunked prefill
    config = EngineConfig(scheduler=SchedulerConfig(**sched), cache=CacheConfig(block_size=4, num_blocks=256),
                          adapter_dir=str(tmp_path / f"store-{caching}"), enable_prefix_caching=caching)
    return LLMEngine(config, base)


def jobs_of(names: list[str | None]) -> list[tuple[str | None, dict]]:
    jobs = []
    for name in names:
        path = CASES / name / "case.json" if name else CASES / "BASE_GREEDY.json"
        jobs += [(name, ref) for ref in json.loads(path.read_text())["references"]]
    return jobs


@pytest.mark.parametrize("caching", [True, False])
def test_mixed_batches_match_transformers_with_and_without_the_cache(base_fp32, tmp_path, caching):
    # every adapter and the base model run the same two prompts (24 shared template tokens): a
    # block reused across adapters would change their tokens. Two waves with the cache: the second
    # finds every full block of its prompt cached (36 of 37 or 38 tokens) and computes the rest in
    # one chunk. Without it one wave (a second would compute the same batch again).
    jobs = jobs_of([None, *ADAPTERS]) * 2
    random.Random(3).shuffle(jobs)
    with make(base_fp32, tmp_path, caching) as engine:
        for name in ADAPTERS:
            engine.adapters.register_dir(name, CASES / name)
        for wave in range(2 if caching else 1):
            outs = engine.generate([r["prompt_token_ids"] for _, r in jobs], GREEDY_24, [n for n, _ in jobs])
            for (name, ref), out in zip(jobs, outs):
                assert matches_reference(out.token_ids, ref["greedy_token_ids"], ref["top2_logit_margins"]), name
                if not caching:
                    assert out.cached_tokens == 0
                elif wave == 1:
                    assert out.cached_tokens == 36
        stats = engine.stats()
        assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
        # wave 0: at most 6 run at once, later ones hit the template blocks of their own adapter
        assert (stats["prefix_cache_hits"] > 36 * len(jobs)) is caching


def test_chunked_prefill_resumes_after_a_partial_hit(base_fp32, tmp_path):
    # the second prompt shares 24 template tokens (6 blocks of 4) with the first: it starts at
    # token 24 and computes its 14 other tokens in chunks of at most 5 behind 3 long decodes
    jobs = jobs_of([None])
    with make(base_fp32, tmp_path, True, max_num_seqs=4, max_num_batched_tokens=8) as engine:
        first = engine.generate([jobs[0][1]["prompt_token_ids"]], GREEDY_24)[0]
        assert first.cached_tokens == 0
        out = engine.generate([jobs[1][1]["prompt_token_ids"]], GREEDY_24)[0]
        assert out.cached_tokens == 24
        assert matches_reference(out.token_ids, jobs[1][1]["greedy_token_ids"], jobs[1][1]["top2_logit_margins"])
        assert matches_reference(first.token_ids, jobs[0][1]["greedy_token_ids"], jobs[0][1]["top2_logit_margins"])


def test_same_prompt_under_two_adapters_shares_no_block(base_fp32, tmp_path):
    ids = jobs_of([None])[0][1]["prompt_token_ids"]
    with make(base_fp32, tmp_path, True) as engine:
        for name in ("lora-bias", "lora-rslora"):
            engine.adapters.register_dir(name, CASES / name)
        got = [engine.generate([ids], GREEDY_24, [name])[0].cached_tokens
               for name in ("lora-bias", "lora-rslora", None, "lora-rslora", "lora-bias")]
    assert got == [0, 0, 0, 36, 36]


def test_hot_swap_never_hits_old_blocks_but_an_unchanged_reupload_does(base_fp32, tmp_path):
    name = "inttune-nystrom-tied"
    ids = jobs_of([None])[0][1]["prompt_token_ids"]
    with make(base_fp32, tmp_path, True) as engine:
        v1 = engine.adapters.register_dir(name, CASES / name)
        n1 = safetensors.torch.load_file(v1.path / "adapter_model.safetensors")
        before = engine.generate([ids], GREEDY_24, [name])[0]
        v2 = engine.adapters.swap(name, safetensors.torch.save({k: (t * 1.5).contiguous() for k, t in n1.items()}))
        swapped = engine.generate([ids], GREEDY_24, [name])[0]
        v3 = engine.adapters.swap(name, safetensors.torch.save(n1))  # the v1 weights again
        back = engine.generate([ids], GREEDY_24, [name])[0]
    assert (v2.content_hash != v1.content_hash, v3.content_hash == v1.content_hash) == (True, True)
    assert (before.adapter_version, swapped.adapter_version, back.adapter_version) == (1, 2, 3)
    assert (before.cached_tokens, swapped.cached_tokens, back.cached_tokens) == (0, 0, 36)
    assert swapped.token_ids != before.token_ids and back.token_ids == before.token_ids
    ref = json.loads((CASES / name / "case.json").read_text())["references"][0]
    assert matches_reference(back.token_ids, ref["greedy_token_ids"], ref["top2_logit_margins"])


def test_preempted_long_prompt_hits_its_own_blocks_and_matches_transformers(base_fp32, hf_model):
    tok = base_fp32.tokenizer()
    story = " ".join(f"Day {i}: the keeper of lighthouse {i % 7} logged {i * 3} ships and a calm sea."
                     for i in range(60))
    long_ids = tok.encode(story, add_special_tokens=False)[:1040]
    short = [tok.encode(f"Question {i}: name three colours of the rainbow. Answer:", add_special_tokens=False)
             for i in range(2)]
    # as test_model's preemption case: 68 blocks, the long request (66 blocks) is preempted; its
    # published blocks stay cached while free, so its recompute starts from them
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128, max_model_len=1060),
                          cache=CacheConfig(block_size=16, num_blocks=68))
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0)
    with LLMEngine(config, base_fp32) as engine:
        outs = engine.generate(short + [long_ids], params)
        stats = engine.stats()
    assert stats["preemptions"] >= 1 and stats["kv_blocks_used"] == 0
    assert stats["prefix_cache_hits"] >= 512  # the recompute skipped at least 32 of its 66 blocks
    assert stats["computed_tokens"] < len(long_ids) * 2 + 200
    for ids, out in zip(short + [long_ids], outs):
        want, margins = hf_greedy(hf_model, ids, 16)
        assert matches_reference(out.token_ids, want, margins)


def test_root_key_is_hashed_once_per_sequence_over_a_long_generation(base_fp32, tmp_path, monkeypatch):
    # the root key hashes the whole salt: it was hashed again each time a sequence filled a block
    # (once per 4 tokens here: 17 times per sequence over 37-38 prompt + 64 output tokens), so a 15 MB salt
    # cost 56 ms of the engine's step thread per block, for every tenant's requests
    calls: list[str] = []
    real = prefix_cache.root_key
    monkeypatch.setattr(prefix_cache, "root_key", lambda seq: calls.append(seq.request_id) or real(seq))
    refs = [job[1] for job in jobs_of([None])]
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128),
                          cache=CacheConfig(block_size=4, num_blocks=256), adapter_dir=str(tmp_path / "store"))
    core = EngineCore(config, base_fp32)
    params = SamplingParams(max_tokens=64, min_tokens=64, temperature=0.0)
    for i, ref in enumerate(refs):
        core.add(f"r{i}", ref["prompt_token_ids"], params, cache_salt=f"{i}" * 1024)  # the front ends' bound
    produced = {f"r{i}": 0 for i in range(len(refs))}
    while core.has_work():
        for out in core.step():
            produced[out.request_id] += len(out.token_ids)
    assert produced == {f"r{i}": 64 for i in range(len(refs))}
    assert sorted(calls) == sorted(produced)  # once per sequence


@pytest.mark.parametrize("policy, light_cached", [("fcfs", 0), ("fair", 36)])
def test_a_heavy_tenants_churn_evicts_its_own_blocks_under_fair(base_fp32, hf_model, policy, light_cached):
    # 24 blocks of 4 tokens; the light tenant's prompt (37 tokens) and output fill 10 cached blocks,
    # then the heavy tenant runs three distinct prompts of as many blocks, one after another. One LRU
    # (fcfs) reuses the light tenant's blocks, the oldest; fair eviction takes the heavy tenant's own.
    light = jobs_of([None])[0][1]
    heavy = [[100 + k] + light["prompt_token_ids"][1:] for k in range(3)]  # distinct from block 0 on
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                                    policy=policy),
                          cache=CacheConfig(block_size=4, num_blocks=24))
    core = EngineCore(config, base_fp32)
    params = SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}

    def run(rid: str, tenant: str, ids: list[int]) -> None:
        core.add(rid, ids, params, tenant=tenant, cache_salt=f"tenant:{tenant}")
        while core.has_work():
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
                cached[out.request_id] = out.cached_tokens

    run("light-0", "light", light["prompt_token_ids"])
    for k, ids in enumerate(heavy):
        run(f"heavy-{k}", "heavy", ids)
    run("light-1", "light", light["prompt_token_ids"])
    assert cached["light-1"] == light_cached
    for rid in ("light-0", "light-1"):
        assert matches_reference(tokens[rid], light["greedy_token_ids"][:4], light["top2_logit_margins"])
    want, margins = hf_greedy(hf_model, heavy[2], 4)
    assert matches_reference(tokens["heavy-2"], want, margins)
