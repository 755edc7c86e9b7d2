"""Scheduler and block manager against hand-computed step plans (no model)."""

from __future__ import annotations

import pytest

from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.config import SchedulerConfig
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.scheduler import Scheduler
from nlora_serve.engine.scheduling.sequence import Sequence, SequenceStatus


def make(num_blocks: int, block_size: int = 4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def seq(arrival: int, prompt_len: int) -> Sequence:
    return Sequence(f"r{arrival}", arrival, list(range(prompt_len)), prompt_len, SamplingParams())


def run_step(sched: Scheduler) -> list[tuple[str, int]]:
    """Schedule one step and play the model: computed tokens advance, finished prefills sample a token."""
    batch = sched.schedule()
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(0)
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_tokens)]


def test_budget_and_chunked_prefill():
    sched = make(64, max_num_seqs=4, max_num_batched_tokens=10, max_model_len=64)
    a, b = seq(0, 25), seq(1, 4)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [("r0", 10)]  # the budget is spent on A's first chunk
    assert run_step(sched) == [("r0", 10)]
    assert run_step(sched) == [("r0", 5), ("r1", 4)]  # A's last chunk, then B fits in what is left
    assert run_step(sched) == [("r0", 1), ("r1", 1)]  # both decode
    assert a.num_computed_tokens == 26 and len(a.block_table) == 7  # ceil(27 / 4): room for the next token


def test_decodes_before_prefill_chunks():
    sched = make(64, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    a, b = seq(0, 3), seq(1, 20)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [("r0", 3), ("r1", 5)]
    assert run_step(sched) == [("r0", 1), ("r1", 7)]  # A's decode first, B's chunk gets the rest


def test_fcfs_head_of_line_blocks_later_arrivals():
    sched = make(6, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=24)
    a, b, c = seq(0, 16), seq(1, 12), seq(2, 2)
    for s in (a, b, c):
        sched.add(s)
    # A takes 4 of 6 blocks; B needs 3 and waits; C (1 block) would fit but may not overtake B
    assert run_step(sched) == [("r0", 16)]
    assert [s.request_id for s in sched.waiting] == ["r1", "r2"]


def test_max_num_seqs():
    sched = make(64, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    for i in range(3):
        sched.add(seq(i, 4))
    assert [r for r, _ in run_step(sched)] == ["r0", "r1"]
    assert len(sched.waiting) == 1


def test_preemption_newest_first_and_requeued_by_arrival():
    sched = make(4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=16)
    a, b, c = seq(0, 8), seq(1, 2), seq(2, 2)
    for s in (a, b, c):
        sched.add(s)
    assert run_step(sched) == [("r0", 8), ("r1", 2), ("r2", 2)]  # 2 + 1 + 1 blocks: none left
    batch = sched.schedule()  # A's 9th token needs a 3rd block: the newest running (C) gives it up
    assert batch.preempted == [c]
    assert list(zip(batch.seqs, batch.num_tokens)) == [(a, 1), (b, 1)]
    assert batch.total_tokens == 2  # C's token was taken back with its slot
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and list(sched.waiting) == [c]
    assert len(a.block_table) == 3 and sched.blocks.num_free_blocks == 0


def test_preempted_sequence_recomputes_prompt_and_output():
    sched = make(4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=16)
    a, b, c = seq(0, 8), seq(1, 2), seq(2, 2)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    assert run_step(sched) == [("r0", 1), ("r1", 1)]  # C preempted with 1 generated token
    sched.finish(a)
    assert run_step(sched) == [("r1", 1), ("r2", 3)]  # C readmitted: 2 prompt + 1 output tokens
    assert c.num_computed_tokens == 3 and c.num_tokens == 4


def test_finish_frees_blocks_exactly_once():
    sched = make(16, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32)
    a = seq(0, 9)
    sched.add(a)
    run_step(sched)
    assert sched.blocks.num_used_blocks == 3
    sched.finish(a)
    sched.finish(a)  # a second retire is a no-op, not a double free
    assert sched.blocks.num_used_blocks == 0 and not sched.has_work()
    with pytest.raises(RuntimeError, match="freed twice"):
        sched.blocks.free([0])


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(max_model_len=0)

