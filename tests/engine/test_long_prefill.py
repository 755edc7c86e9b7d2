"""--long-prefill-token-threshold (vLLM 0.32's rule): step plans worked out by hand, and greedy
tokens against transformers when prompts are cut into threshold-sized chunks, with and without
prefix-cache hits in front of them."""

from __future__ import annotations

import pytest

from greedy_rule import matches_reference
from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.config import FAIR_LONG_PREFILL_TOKEN_THRESHOLD, CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.scheduler import Scheduler
from nlora_serve.engine.scheduling.sequence import Sequence
from test_model import hf_greedy
from test_scheduler import run_step  # schedule one step and play the model


def make(**cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(64, 4))


def seq(arrival: int, prompt_len: int, tenant: str | None = None) -> Sequence:
    return Sequence(f"r{arrival}", arrival, list(range(prompt_len)), prompt_len, SamplingParams(), tenant=tenant)


def test_off_a_long_prompt_takes_the_budget_from_a_later_short_one():
    sched = make(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    for s in (seq(0, 3), seq(1, 20), seq(2, 6)):
        sched.add(s)
    assert run_step(sched) == [("r0", 3), ("r1", 13)]  # r2 waits: the budget went to r1
    assert run_step(sched) == [("r0", 1), ("r1", 7), ("r2", 6)]


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_long_prefill_gets_the_threshold_while_others_decode_and_prefill(policy):
    sched = make(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, long_prefill_token_threshold=4,
                 policy=policy)
    for s in (seq(0, 3, "carol"), seq(1, 20, "bob"), seq(2, 6, "carol")):
        sched.add(s)
    # 3 requests: r0's 3 tokens are not long; r1 has 20 left, r2 6: both long, 4 each
    assert run_step(sched) == [("r0", 3), ("r1", 4), ("r2", 4)]
    # r0 decodes; r1 has 16 left (4), r2 2 (not long: all 2)
    assert run_step(sched) == [("r0", 1), ("r1", 4), ("r2", 2)]
    assert run_step(sched) == [("r0", 1), ("r2", 1), ("r1", 4)]  # decodes first; r1: 12 left
    assert run_step(sched) == [("r0", 1), ("r2", 1), ("r1", 4)]  # 8 left
    assert run_step(sched) == [("r0", 1), ("r2", 1), ("r1", 4)]  # 4 left: not more than 4, all of it
    assert run_step(sched) == [("r0", 1), ("r1", 1), ("r2", 1)]  # all decode


def test_a_lone_long_prompt_takes_the_whole_budget_until_someone_arrives():
    sched = make(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, long_prefill_token_threshold=4)
    sched.add(seq(0, 40))
    assert run_step(sched) == [("r0", 16)]  # nobody to starve: no cap
    sched.add(seq(1, 2))
    assert run_step(sched) == [("r0", 4), ("r1", 2)]  # 24 left, capped at 4; r1's 2 are not long
    assert run_step(sched) == [("r1", 1), ("r0", 4)]
    sched.finish(sched.running[1])  # r1 leaves: r0 is alone again
    assert run_step(sched) == [("r0", 16)]  # its last 16 in one step


def test_adaptive_floors_the_threshold_at_a_fair_share_of_the_budget():
    plans = {}
    for adaptive in (False, True):
        sched = make(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, long_prefill_token_threshold=2,
                     long_prefill_token_threshold_adaptive=adaptive)
        for i in range(3):
            sched.add(seq(i, 20))
        plans[adaptive] = run_step(sched)
    assert plans[False] == [("r0", 2), ("r1", 2), ("r2", 2)]
    assert plans[True] == [("r0", 5), ("r1", 5), ("r2", 5)]  # max(2, 16 // 3)


def test_fair_caps_long_prefills_between_tenants_by_default_and_an_explicit_0_is_off():
    def plan(policy: str, tenants: tuple[str, str], steps: int = 2, **cfg) -> list[list[tuple[str, int]]]:
        sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512,
                                          policy=policy, **cfg), BlockManager(256, 4))
        sched.add(seq(0, 300, tenants[0]))  # bob's long prompt first, then another request's short one
        sched.add(seq(1, 8, tenants[1]))
        return [run_step(sched) for _ in range(steps)]

    assert FAIR_LONG_PREFILL_TOKEN_THRESHOLD == 128
    # unset under fair, two tenants: 128 a step while carol prefills, then decodes
    assert plan("fair", ("bob", "carol"), 3) == [[("r0", 128), ("r1", 8)], [("r1", 1), ("r0", 128)],
                                                 [("r1", 1), ("r0", 44)]]
    whole = [[("r0", 300), ("r1", 8)], [("r0", 1), ("r1", 1)]]
    assert plan("fair", ("bob", "carol"), long_prefill_token_threshold=0) == whole  # explicit 0: off, as vLLM
    assert plan("fair", ("bob", "bob")) == whole  # one tenant: no other tenant's stream to stall
    assert plan("fcfs", ("bob", "carol")) == whole  # fcfs keeps vLLM's default
    assert plan("fair", ("bob", "carol"), 1, long_prefill_token_threshold=64) == [[("r0", 64), ("r1", 8)]]
    assert plan("fcfs", ("bob", "bob"), 1, long_prefill_token_threshold=64) == [[("r0", 64), ("r1", 8)]]


def test_the_fair_default_is_the_cpus(monkeypatch):
    import torch

    from nlora_serve.engine import config as config_module

    scheduler = SchedulerConfig(policy="fair")
    assert EngineConfig(device="cpu", scheduler=scheduler).scheduler.long_prefill_token_threshold is None
    monkeypatch.setattr(config_module, "resolve_device", lambda name: torch.device("cuda"))  # no GPU needed
    assert EngineConfig(device="cuda", scheduler=scheduler).scheduler.long_prefill_token_threshold == 0
    assert scheduler.long_prefill_token_threshold is None  # a copy changed, not the caller's
    chosen = SchedulerConfig(policy="fair", long_prefill_token_threshold=256)
    assert EngineConfig(device="cuda", scheduler=chosen).scheduler.long_prefill_token_threshold == 256


def test_config_validation_names_the_flag():
    SchedulerConfig(max_model_len=64, long_prefill_token_threshold=64)  # up to max_model_len, as vLLM
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(ValueError, match=r"long_prefill_token_threshold \(--long-prefill-token-threshold\)"):
            SchedulerConfig(max_model_len=64, long_prefill_token_threshold=bad)
    with pytest.raises(ValueError, match="--long-prefill-token-threshold-adaptive"):
        SchedulerConfig(long_prefill_token_threshold_adaptive=1)


def _record_prefill_chunks(engine: LLMEngine) -> dict[int, list[int]]:
    """Prompt length -> the prefill chunks its sequence was given, step by step, recorded from the
    engine's scheduler (the prompts of a test have distinct lengths)."""
    chunks: dict[int, list[int]] = {}
    schedule = engine.core.scheduler.schedule

    def recording():
        batch = schedule()
        for s, n in zip(batch.seqs, batch.num_tokens):
            if s.num_computed_tokens < s.num_prompt_tokens:
                chunks.setdefault(s.num_prompt_tokens, []).append(n)
        return batch

    engine.core.scheduler.schedule = recording
    return chunks


def _prompts(base) -> tuple[list[int], list[list[int]]]:
    tok = base.tokenizer()
    story = " ".join(f"Day {i}: the keeper of lighthouse {i % 7} logged {i * 3} ships and a calm sea."
                     for i in range(12))
    long_ids = tok.encode(story, add_special_tokens=False)[:150]
    short = [tok.encode(f"Question {i}: name three colours of the rainbow. Answer:", add_special_tokens=False)
             for i in range(3)]
    return long_ids, short


def _engine(base, caching: bool) -> LLMEngine:
    # threshold 7 against blocks of 4: chunk ends fall inside blocks, and after a cached prefix
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                                long_prefill_token_threshold=7)
    return LLMEngine(EngineConfig(scheduler=scheduler, cache=CacheConfig(block_size=4, num_blocks=256),
                                  enable_prefix_caching=caching), base)


def test_threshold_chunks_match_transformers(base_fp32, hf_model):
    long_ids, short = _prompts(base_fp32)
    # the short ones outlive the long prefill (2 chunks + 24 decodes > 150 / 7 steps): it is never
    # alone, so every chunk is 7 (the budget, 64, would have taken it in 3), the last the 150 % 7 left
    params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
    with _engine(base_fp32, caching=False) as engine:
        chunks = _record_prefill_chunks(engine)
        outs = engine.generate(short + [long_ids], params)
    assert len(long_ids) == 150 and chunks[150] == [7] * 21 + [3]
    for ids, out in zip(short + [long_ids], outs):
        want, margins = hf_greedy(hf_model, ids, 24)
        assert matches_reference(out.token_ids, want, margins)


def test_threshold_chunks_after_a_prefix_hit_match_transformers(base_fp32, hf_model):
    long_ids, short = _prompts(base_fp32)
    variant = long_ids[:100] + short[0] + short[1]  # shares 100 tokens (25 blocks of 4) with long_ids
    tail = len(variant) - 100
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0)
    with _engine(base_fp32, caching=True) as engine:
        first = engine.generate([long_ids], params)[0]  # alone: chunks of the budget
        chunks = _record_prefill_chunks(engine)
        outs = engine.generate(short[1:] + [variant], params)
    # its uncached tail in chunks of 7 from token 100 (ends inside blocks), beside two short prompts
    assert outs[-1].cached_tokens == 100
    assert chunks[len(variant)] == [7] * (tail // 7) + [tail % 7] * (tail % 7 > 0)
    for ids, out in zip([long_ids] + short[1:] + [variant], [first] + outs):
        want, margins = hf_greedy(hf_model, ids, 12)
        assert matches_reference(out.token_ids, want, margins)


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_the_flags_fill_the_scheduler_config_and_errors_name_the_flag(command):
    import argparse

    from nlora_serve.serving.commands.engine_flags import device_config, in_flag_words
    from nlora_serve.serving.commands.generate_flags import add_generate_arguments
    from nlora_serve.serving.commands.serve import add_serve_arguments

    parser = argparse.ArgumentParser()
    (add_serve_arguments if command == "serve" else add_generate_arguments)(parser)
    extra = ["--prompt", "x"] if command == "generate" else []
    default = device_config(parser.parse_args(["--device", "cpu", *extra])).scheduler
    # unset: the scheduler's default for the policy (0 under fcfs; 128 between tenants under fair)
    assert (default.long_prefill_token_threshold, default.long_prefill_token_threshold_adaptive) == (None, False)
    args = parser.parse_args(["--device", "cpu", "--long-prefill-token-threshold", "0", *extra])
    assert device_config(args).scheduler.long_prefill_token_threshold == 0  # explicit 0: off
    args = parser.parse_args(["--device", "cpu", "--long-prefill-token-threshold", "256",
                              "--long-prefill-token-threshold-adaptive", *extra])
    chosen = device_config(args).scheduler
    assert (chosen.long_prefill_token_threshold, chosen.long_prefill_token_threshold_adaptive) == (256, True)
    args = parser.parse_args(["--device", "cpu", "--max-model-len", "512", "--long-prefill-token-threshold", "600",
                              *extra])
    with pytest.raises(ValueError) as refused:
        device_config(args)
    assert in_flag_words(str(refused.value), args) == ("--long-prefill-token-threshold 600: must be an integer from 0 "
                                                       "(off) to max_model_len (512); got 600")
