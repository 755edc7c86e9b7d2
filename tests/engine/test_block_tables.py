"""The persistent block-table rows (engine/runner/block_tables.py) against plain-Python padded lists, through
the real scheduler: admissions, appended blocks, preemptions, finishes, aborts and prefix-cache hits."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.runner.block_tables import BlockTables
from nlora_serve.engine.config import SchedulerConfig
from nlora_serve.engine.scheduling.prefix_cache import PrefixCachingBlockManager
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.scheduler import Scheduler
from nlora_serve.engine.scheduling.sequence import Sequence


def padded(tables: list[list[int]]) -> list[list[int]]:
    """The reference: each list padded with block 0 to the longest."""
    width = max((len(t) for t in tables), default=0)
    return [t + [0] * (width - len(t)) for t in tables]


def seq(arrival: int, tokens: list[int]) -> Sequence:
    return Sequence(f"r{arrival}", arrival, list(tokens), len(tokens), SamplingParams())


def test_rows_equal_padded_lists_and_grow():
    tables = BlockTables(rows=1, width=1)  # both dimensions must grow
    a, b, c = seq(0, [1]), seq(1, [2]), seq(2, [3])
    a.block_table, b.block_table, c.block_table = [7, 3], [1, 5, 2], [4]
    assert tables.gather([b, a, c]).tolist() == [[1, 5, 2], [7, 3, 0], [4, 0, 0]]
    assert tables.gather([c]).tolist() == [[4]]  # width: the longest of this step only
    assert tables.gather([]).shape == (0, 0)
    # a device step's rows, 16k blocks wide (step_inputs.TABLE_WIDTH_STEP), gathered as such
    assert tables.gather([b, a], 16).tolist() == [[1, 5, 2] + [0] * 13, [7, 3] + [0] * 14]
    assert tables.gather([], 16).shape == (0, 0)


def test_a_row_is_written_only_when_its_list_changes(monkeypatch):
    """Decode steps write a row at admission and then once per block boundary, never per step."""
    tables, writes = BlockTables(), []
    original = BlockTables._write
    monkeypatch.setattr(BlockTables, "_write", lambda self, s, st: (writes.append(s.request_id), original(self, s, st))[1])
    seqs = [seq(i, [i]) for i in range(3)]
    for s, n in zip(seqs, (1, 2, 3)):
        s.block_table = list(range(10 * s.arrival, 10 * s.arrival + n))
    tables.gather(seqs)
    assert writes == ["r0", "r1", "r2"]
    for _ in range(5):
        tables.gather(seqs)
    assert writes == ["r0", "r1", "r2"]
    seqs[1].block_table.append(99)  # a block boundary
    assert tables.gather(seqs).tolist() == padded([s.block_table for s in seqs])
    assert writes == ["r0", "r1", "r2", "r1"]


def test_preempted_and_readmitted_to_a_list_of_the_same_length_is_rewritten():
    """Between two gathers a sequence loses its blocks and gets as many others back: its list has
    the length its row was written with, but every entry differs (the row must not be trusted)."""
    tables = BlockTables()
    blocks = BlockManager(6, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=24), blocks)
    a = seq(0, list(range(8)))
    sched.add(a)
    batch = sched.schedule()
    first = list(a.block_table)
    assert tables.gather(batch.seqs).tolist() == [first]
    filler = []
    sched._preempt(a)
    blocks.grow(filler, 8)  # someone else takes the two blocks it had
    batch = sched.schedule()
    assert batch.seqs == [a] and len(a.block_table) == len(first) and set(a.block_table).isdisjoint(first)
    assert tables.gather(batch.seqs).tolist() == [a.block_table]


def test_shorter_list_on_a_reused_row_is_padded_with_zeros():
    tables = BlockTables(rows=1)
    a, b = seq(0, [1]), seq(1, [2])
    a.block_table, b.block_table = [5, 6, 7], [9]
    tables.gather([a])
    assert tables.gather([b]).tolist() == [[9]]  # no row free: a (not in this step) gives up its row
    assert tables.row(b) == 0 and tables.row(a) is None
    assert tables.table[0, :3].tolist() == [9, 0, 0]


class TablesMachine(RuleBasedStateMachine):
    """Random admissions (sharing prefixes, so the prefix cache hits), steps, finishes, aborts and
    preemptions on a small pool; every step's gathered rows must equal the padded block lists."""

    @initialize(prefix_cache=st.booleans(), fair=st.booleans(), rows=st.integers(1, 4))
    def setup(self, prefix_cache, fair, rows):
        kind = PrefixCachingBlockManager if prefix_cache else BlockManager
        self.blocks = kind(24, 2)
        cfg = SchedulerConfig(max_num_seqs=5, max_num_batched_tokens=12, max_model_len=40,
                              policy="fair" if fair else "fcfs")
        self.sched = Scheduler(cfg, self.blocks)
        self.tables = BlockTables(rows=rows, width=1)
        self.arrivals = 0
        self.live: list[Sequence] = []
        self.checked = 0

    @rule(prefix=st.integers(0, 2), length=st.integers(1, 9), tenant=st.sampled_from(["a", "b"]))
    def admit(self, prefix, length, tenant):
        tokens = ([7] * 4 + [prefix] * 4 + list(range(length)))[: 4 + length]
        s = Sequence(f"r{self.arrivals}", self.arrivals, tokens, len(tokens), SamplingParams(), tenant=tenant)
        self.arrivals += 1
        self.sched.add(s)
        self.live.append(s)

    @precondition(lambda self: self.live)
    @rule()
    def step(self):
        batch = self.sched.schedule()
        got = self.tables.gather(batch.seqs)
        assert got.dtype == torch.int32 and got.tolist() == padded([s.block_table for s in batch.seqs])
        rows = [self.tables.row(s) for s in batch.seqs]
        assert None not in rows and len(set(rows)) == len(rows)  # one row each
        self.checked += 1
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed_tokens += n
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(3)
        for s in list(self.live):
            if s.num_tokens >= 30:
                self._end(s)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def finish_or_abort(self, i):
        self._end(self.live[i % len(self.live)])

    @precondition(lambda self: self.sched.running)
    @rule(i=st.integers(0, 100))
    def preempt(self, i):
        self.sched._preempt(self.sched.running[i % len(self.sched.running)])

    def _end(self, s):
        self.sched.finish(s)
        self.tables.release(s)  # as EngineCore._retire does: its row is reused at once
        assert self.tables.row(s) is None
        self.live.remove(s)

    @invariant()
    def rows_never_exceed_what_runs(self):
        if hasattr(self, "tables"):  # rows are reclaimed: growth stops once twice what can run fits
            assert self.tables.table.shape[0] <= 4 * self.sched.config.max_num_seqs


TablesMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)
TestTablesMachine = TablesMachine.TestCase
