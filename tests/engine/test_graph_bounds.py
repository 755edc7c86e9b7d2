"""The captured graphs' bounds (engine/runner/keyed_graphs.py).

Unit-level, on fakes of the real KeyedGraphs and ModelRunner code: at most ``max_combinations``
adapter-pool combinations keep graphs (the base model's never counted nor evicted); a new one over
the cap runs eagerly while every kept one is in use, and evicts the least recently used one (all
its sizes) once that one has gone ``idle_steps`` steps unused; a retired pool's graphs go at the
start of the runner's next step, not at its next capture; a step over the cap runs eagerly and is
counted. Hand-computed expectations throughout.
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from nlora_serve.engine.runner.keyed_graphs import MAX_ADAPTER_COMBINATIONS, KeyedGraphs
from nlora_serve.engine.runner.model_runner import ModelRunner


class Graphs(KeyedGraphs):
    sizes = (1, 2, 4)

    def _capture(self, size, pools, hook):
        self.captures.append((size, tuple(p.name for p in pools)))
        return size, list(pools)  # as a real capture's closure does, it keeps its pools


class Pool:
    def __init__(self, name, generation=0):
        self.name, self.generation, self.retired = name, generation, False


def _graphs(**bounds) -> Graphs:
    graphs = Graphs(**bounds)
    graphs.captures = []
    return graphs


def test_over_the_cap_a_new_combination_runs_eagerly_until_the_oldest_goes_idle():
    graphs = _graphs(max_combinations=2, idle_steps=4)
    a, b, c = Pool("a"), Pool("b"), Pool("c")
    graphs.capture_base()
    for size, pools in ((1, [a]), (2, [a]), (1, [b])):  # ticks 1-3
        assert graphs.graph_for(size, pools, None) == (size, pools)
    for _ in range(2):  # ticks 4, 5: a third combination; a (tick 2) and b (tick 3) used within 4 steps
        assert graphs.graph_for(4, [a, b], None) is None
    assert graphs.graph_for(1, [b], None) is not None  # tick 6: b's graph replays
    assert graphs.counts["graph_evictions"] == 0
    # tick 7: a last used at tick 2, 5 steps ago (>= 4): evicted, both its sizes; c takes its place
    assert graphs.graph_for(2, [c], None) == (2, [c])
    assert graphs.counts["graph_evictions"] == 1
    assert sorted(k for k in graphs.graphs if k[1]) == sorted([(1, ((id(b), 0),)), (2, ((id(c), 0),))])
    assert [k for k in graphs.graphs if not k[1]] == [(4, ()), (2, ()), (1, ())]  # base graphs stay
    assert graphs.graph_for(1, [a], None) is None  # tick 8: b (tick 6), c (tick 7) in use: a runs eagerly
    assert graphs.captures[-1] == (2, ("c",)) and graphs.counts["graph_evictions"] == 1


def test_the_cap_counts_combinations_not_sizes_and_base_steps_are_always_graphed():
    graphs = _graphs(max_combinations=1, idle_steps=0)
    a, b = Pool("a"), Pool("b")
    for size in (1, 2, 4):
        assert graphs.graph_for(size, [a], None) is not None
    for size in (1, 2, 4):
        assert graphs.graph_for(size, [], None) == (size, [])
    assert graphs.graph_for(1, [b], None) is not None  # idle_steps 0: a is evicted at once
    assert {k[1] for k in graphs.graphs} == {(), ((id(b), 0),)}
    assert Graphs(max_combinations=0).graph_for(1, [a], None) is None
    assert MAX_ADAPTER_COMBINATIONS == 8
    with pytest.raises(ValueError, match="max_combinations"):
        Graphs(max_combinations=-1)


def test_a_pool_that_grew_frees_its_old_graphs_of_every_size_and_its_place():
    graphs = _graphs(max_combinations=1, idle_steps=10 ** 6)
    a = Pool("a", generation=5)
    graphs.graph_for(1, [a], None)
    graphs.graph_for(4, [a], None)
    a.generation = 9  # grown: the old graphs read freed memory and are never replayed again
    assert graphs.graph_for(2, [a], None) is not None  # not refused: the stale combination left the cap
    assert sorted(graphs.graphs) == [(2, ((id(a), 9),))]


def _runner(graphs, prepared: list) -> SimpleNamespace:
    """The ModelRunner attributes execute reads, around a real ``graphs`` (a decode step of one sequence)."""
    runner = SimpleNamespace(graphs=graphs, pieces=None, adapter_hook=None, kv_cache=None, _steps=0,
                             step_counts={"graph_steps": 0, "eager_steps": 0, "graph_cap_eager_steps": 0})
    runner.drop_stale_graphs = lambda: ModelRunner.drop_stale_graphs(runner)

    def prepare(pairs, previous=None):
        prepared.append(sorted(graphs.graphs))
        return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), SimpleNamespace(num_decodes=1)

    runner.prepare = prepare
    runner.model = lambda *args: "eager logits"
    return runner


def test_a_retired_pools_graphs_go_at_the_start_of_the_next_step():
    """Residency.free retires a pool on whichever thread frees its last adapter; the step thread drops
    its graphs (and lets the pool go) before its next step's inputs, even a step that captures nothing."""
    graphs = _graphs()
    a, b = Pool("a"), Pool("b")
    graphs.capture_base()
    graphs.graph_for(1, [a], None)
    graphs.graph_for(1, [b], None)
    gone = weakref.ref(a)
    a.retired = True  # another thread
    del a
    seen = []
    graphs.run = lambda *args: "graph logits"  # a base step: replays, captures nothing
    runner = _runner(graphs, seen)
    assert ModelRunner.execute(runner, [(None, 1)]) == "graph logits"
    gc.collect()
    assert gone() is None
    assert seen == [sorted([(1, ()), (2, ()), (4, ()), (1, ((id(b), 0),))])]


def test_a_step_over_the_cap_runs_eagerly_and_is_counted():
    graphs = _graphs(max_combinations=0)
    graphs.run = lambda ids, pos, info, hook: None  # DecodeGraphs.run when graph_for refuses
    runner = _runner(graphs, [])
    assert ModelRunner.execute(runner, [(None, 1)]) == "eager logits"
    assert runner.step_counts == {"graph_steps": 0, "eager_steps": 1, "graph_cap_eager_steps": 1}


def test_warm_up_captures_no_graph_of_a_pool_over_the_cap():
    """capture_adapter_graphs (engine/runner/warmup.py) on a cap of one combination: the first named
    pool gets every size, the second none (its steps will run eagerly), and is not counted."""
    from nlora_serve.engine.runner.warmup import capture_adapter_graphs

    graphs = _graphs(max_combinations=1, idle_steps=10 ** 6)
    versions = {n: SimpleNamespace(name=n, pool=Pool(n)) for n in "ab"}

    class Hook:
        def begin_step(self, step_versions, lens, device):
            self.version = step_versions[0]

        def graphable(self):
            return True

        def per_token_pools(self):
            return [self.version.pool]

        def end_step(self):
            pass

    adapters = SimpleNamespace(acquire=versions.__getitem__, release=lambda v: None)
    core = SimpleNamespace(runner=SimpleNamespace(graphs=graphs, pieces=None), hook=Hook(), adapters=adapters,
                           device="cpu")
    assert capture_adapter_graphs(core, ("a", "b")) == 3
    assert graphs.captures == [(4, ("a",)), (2, ("a",)), (1, ("a",))]


def test_the_idle_rule_counts_every_step_of_the_runner_not_only_those_of_one_graph_kind():
    """Decode and piecewise graphs share the runner's step clock: a piecewise combination unused for
    ``idle_steps`` steps, decode steps among them, gives way. With a count of its own graph_for calls
    (prefill and mixed steps only) it waited that many *prefill* steps: here, for ever."""
    runner = SimpleNamespace(graphs=None, pieces=None, _steps=0)
    clock = lambda: ModelRunner.steps_started(runner)  # noqa: E731
    pieces = _graphs(max_combinations=1, idle_steps=5, clock=clock)
    runner.pieces = pieces
    a, b = Pool("a"), Pool("b")
    ModelRunner.drop_stale_graphs(runner)  # step 1: a prefill on a's pool
    assert pieces.graph_for(1, [a], None) is not None
    for _ in range(3):  # steps 2-4: decode steps, no piecewise graph met
        ModelRunner.drop_stale_graphs(runner)
    ModelRunner.drop_stale_graphs(runner)  # step 5: a prefill on b's pool: a unused for 4 steps, kept
    assert pieces.graph_for(1, [b], None) is None
    ModelRunner.drop_stale_graphs(runner)  # step 6: a unused for 5 steps: b takes its place
    assert pieces.graph_for(1, [b], None) is not None
    assert pieces.counts["graph_evictions"] == 1 and ModelRunner.steps_started(runner) == 6


def test_a_decode_step_over_the_cap_runs_eagerly_not_through_the_piecewise_graphs():
    """The decode sizes reach max_num_seqs, so no decode-only step met the piecewise graphs before
    the cap; one refused by the decode graphs' cap fell through to them (a new GPU path, L + 1
    captures in the pieces' own LRU, not counted as capped). It runs eagerly, as the cap says."""
    graphs = _graphs(max_combinations=0)
    graphs.run = lambda ids, pos, info, hook: None  # refused: over the cap

    def piecewise(*args):
        raise AssertionError("a capped decode step ran piecewise")

    runner = _runner(graphs, [])
    runner.pieces = SimpleNamespace(size_for=lambda n: 16, run=piecewise, drop_stale=lambda: None)
    runner.step_counts["piecewise_steps"] = 0
    assert ModelRunner.execute(runner, [(None, 1)]) == "eager logits"
    assert runner.step_counts == {"graph_steps": 0, "piecewise_steps": 0, "eager_steps": 1, "graph_cap_eager_steps": 1}
