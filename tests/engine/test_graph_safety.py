"""CUDA-graph safety of decode steps, checked on the CPU (issue 18's Done-when).

The engine's CUDA path runs on CPU tensors (Triton under the interpreter) with its decode graphs
captured through the CPU seam (:class:`EagerCapture`: replay re-runs the step on the same static
buffers), and :class:`GraphSafetyMode` around capture and every replay fails on syncing or
data-dependent ops and on reads of tensors at addresses the capture did not read. Tenants are
registered after capture (a tied pool that grows, a LoRA pool that allocates new site tables);
the greedy tokens must still equal transformers on merged weights.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from greedy_rule import matches_reference  # noqa: E402
from tiny_llama import graph_tenants, hf_greedy  # noqa: E402
from nlora_serve.adapters.runtime.pool import TiedPool  # noqa: E402
from nlora_serve.engine.runner import cuda_graphs  # noqa: E402
from nlora_serve.engine.api import EngineError  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.runner.cuda_graphs import EagerCapture, capture_sizes  # noqa: E402
from nlora_serve.engine.runner.graph_safety import GraphSafetyError, GraphSafetyMode  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402

RANK, ALPHA, NEW = 8, 16.0, 4


def test_mode_refuses_syncs_data_dependent_shapes_and_new_addresses():
    weight, x, grown = torch.randn(4, 4), torch.randn(3, 4), torch.randn(4, 4)
    mode = GraphSafetyMode()
    with mode.run(capture=True):
        (x @ weight).relu()
    with mode.run(capture=False):  # same tensors: a replay may read them
        (x @ weight).relu()
    assert mode.ops == 2
    for bad in (lambda: (x > 0).nonzero(), lambda: float(x.sum()), lambda: x.unique(),
                lambda: torch.repeat_interleave(torch.tensor([1, 2]))):
        with pytest.raises(GraphSafetyError), mode.run(capture=False):
            bad()
    with pytest.raises(GraphSafetyError, match="address the capture did not read"), mode.run(capture=False):
        x @ grown  # a tensor the capture never read: a pool's new tensor after it grew


def test_mode_refuses_a_replay_whose_host_values_differ():
    """A replay re-runs the Python on the CPU, a graph does not: a host value of the step that reaches
    a launch (an op's slice end, a Triton kernel's scalar or grid) must be the captured one, or the
    CPU passes where the GPU replays the capture's value. The earlier checks saw none of it: a
    slice of a static buffer reads no new address, and Triton launches are no torch ops."""
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, n, factor, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)

    static, weight = torch.ones(8, 4), torch.randn(4, 4)
    step = {"rows": 3, "factor": 2.0, "grid": (1,)}

    def run():
        _scale_kernel[step["grid"]](static, static.shape[0], step["factor"], BLOCK=8)
        return static[:step["rows"]] @ weight

    mode = GraphSafetyMode()
    with mode.run(capture=True):
        run()
    with mode.run(capture=False):  # the same host values: a replay
        run()
    assert [c[0] for c in mode.launches] == ["_scale_kernel", "aten.mm.default"]
    for change in ({"rows": 2}, {"factor": 3.0}, {"grid": (2,)}):
        with pytest.raises(GraphSafetyError, match="a replay launched other than the capture did"), \
                mode.run(capture=False):
            run_with = dict(step)
            step.update(change)
            try:
                run()
            finally:
                step.update(run_with)


def test_capture_sizes_are_vllm_buckets():
    assert capture_sizes(64)[:5] == (1, 2, 4, 8, 16) and capture_sizes(64)[-1] == 64
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_model_dir):
    return (*graph_tenants(tmp_path_factory.mktemp("tiny"), RANK, ALPHA), base_model_dir)


def _engine(tiny, tmp_path, overlap: bool = False) -> LLMEngine:
    model_dir, _, _, tokenizer_dir = tiny
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", kernel_backend="triton",
                          async_scheduling=overlap,
                          adapter_dir=str(tmp_path / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(block_size=16, num_blocks=24))
    return LLMEngine(config)


def _run(engine, tiny, names: list[str | None], seed: int):
    _, model, tenants, _ = tiny
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 49152, (6 + 3 * i,), generator=gen).tolist() for i in range(len(names))]
    params = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)
    outs = engine.generate(prompts, params, names)
    for name, prompt, out in zip(names, prompts, outs):
        want, margins = hf_greedy(model if name is None else tenants[name][1], prompt, NEW)
        assert out.adapter == name
        assert matches_reference(out.token_ids, want, margins), (name, out.token_ids, want)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_decode_graphs_safe_and_right_after_tenants_join(tiny, tmp_path, monkeypatch, overlap):
    # async: each decode step's input ids are gathered from the step before's tokens on the device
    monkeypatch.setattr(TiedPool.__init__, "__defaults__", (1, None))  # one slot: the 2nd tied tenant grows it
    capture = EagerCapture(check=True)
    with _engine(tiny, tmp_path, overlap) as engine:
        engine.core.runner.enable_graphs(8, capture, capture_now=True)
        assert sorted(k[0] for k in engine.core.runner.graphs.graphs) == [1, 2, 4, 8]  # base graphs, start-up
        for name in ("tied", "lora_attn"):
            engine.adapters.register_dir(name, tiny[2][name][0])
        _run(engine, tiny, [None, "tied", "lora_attn"], seed=1)
        before = dict(engine.core.runner.graphs.graphs)
        assert before and engine.stats()["graph_steps"] >= NEW - 1
        # after capture: the tied pool grows (new N tensor), the LoRA pool allocates MLP tables
        for name in ("tied2", "lora_all"):
            engine.adapters.register_dir(name, tiny[2][name][0])
        _run(engine, tiny, [None, "tied2", "lora_all", "tied", "lora_attn"], seed=2)
        stats = engine.stats()
    assert capture.replays == stats["graph_steps"] and capture.checked_ops > 1000
    assert stats["eager_steps"] >= 2  # the prefill steps


def test_stale_graph_is_caught(tiny, tmp_path, monkeypatch, caplog):
    """The check has teeth: keying graphs without the pools' generations replays a stale graph."""
    monkeypatch.setattr(TiedPool.__init__, "__defaults__", (1, None))
    # graphs keyed by size and pool identity only: growth goes unnoticed by the graphs (the hook
    # itself still refreshes its views, as it does for eager steps)
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "key",
                        staticmethod(lambda size, pools: (size, tuple((id(p), 0) for p in pools))))
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "drop_stale", lambda self: None)  # nor dropped at a step's start
    with _engine(tiny, tmp_path) as engine:
        engine.core.runner.enable_graphs(8, EagerCapture(check=True))
        engine.adapters.register_dir("tied", tiny[2]["tied"][0])
        _run(engine, tiny, ["tied"], seed=3)
        engine.adapters.register_dir("tied2", tiny[2]["tied2"][0])
        with pytest.raises(EngineError, match=r"the engine failed while running this request"):
            engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=NEW, temperature=0.0), ["tied2"])
    # the cause reaches the server's log, not the client
    assert re.search("GraphSafetyError: .* address the capture did not read", caplog.text)


def test_cuda_capture_tolerates_other_threads(monkeypatch):
    """The CUDA seam captures in thread_local error mode: tenants loaded by an admin thread while the
    step thread captures (pinned memory, a side stream's sync) must not invalidate the capture, as
    the default global mode does (an H200 run failed so). CUDA calls faked: the CPU CI checks the
    arguments the capture passes."""
    seen = {}

    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeGraph:
        def pool(self):
            return "pool"

        def replay(self):
            pass

    class FakeCapture:
        def __init__(self, graph, **kwargs):
            seen.update(kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: FakeCapture(None))
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeCapture)
    cap = cuda_graphs.CudaGraphCapture()
    replay, out = cap.capture(lambda: torch.ones(2))
    assert seen == {"pool": None, "capture_error_mode": "thread_local"}
    assert torch.equal(out, torch.ones(2)) and cap.pool == "pool"


class _FakePool:
    """A tied pool's per-slot tables and generation, no site adapted (kernel_site None: no launch)."""

    rank, bias, generation = 8, {}, 0
    slot_families = torch.full((4,), -2, dtype=torch.int32)  # metadata.TIED
    slot_scalings = torch.ones(4)
    slot_ranks = torch.full((4,), 8, dtype=torch.int32)

    def kernel_site(self, site):
        return None


def test_a_pool_grown_during_a_capture_rebuilds_no_table_inside_it():
    """An admin thread may grow a pool (a new generation) while the step thread captures a graph of
    it, between prepare_pools and the capture. The hook rebuilt the pool's device tables inside the
    capture: a host-to-device copy and a read-back (``bool(any)``), which a CUDA stream capture
    refuses, failing the step and every request in it. Inside static_decode / static_layout it
    keeps the tables it prepared (the graph's key names that generation: the next step recaptures)."""
    from nlora_serve.engine.model.adapter_layer import AdapterHook

    hook, pool, x, y = AdapterHook(triton=True), _FakePool(), torch.ones(2, 4), torch.zeros(2, 4)
    rows = [torch.tensor([0, -1], dtype=torch.int32)]
    hook.prepare_pools([pool], x.device)
    batches = hook.static_batches([pool], rows)
    pool.generation = 1  # grown by another thread after the tables were prepared
    with GraphSafetyMode().run(capture=True), hook.static_decode([pool], rows):
        hook(x, y, 0, ("q_proj",), [4])
    with GraphSafetyMode().run(capture=True), hook.static_layout([pool], batches):
        hook.derive_into([pool], batches)
        hook(x, y, 0, ("q_proj",), [4])
    hook.prepare_pools([pool], x.device)  # outside a static block: the new generation's tables
    assert hook._facts[pool].generation == 1


def test_steps_of_the_same_pools_in_another_sequence_order_share_one_graph():
    """A graph is keyed by its step's pools in order: the pools came in the order their first
    sequences had, so the same two pools with the sequences reordered (requests joining, leaving)
    captured another graph mid-serving. Their order is now one; each row still follows its pool."""
    from types import SimpleNamespace

    from nlora_serve.engine.model.adapter_layer import AdapterHook
    from nlora_serve.engine.runner.keyed_graphs import KeyedGraphs

    hook, a, b = AdapterHook(triton=True), _FakePool(), _FakePool()
    on_a, on_b = SimpleNamespace(pool=a, slot=1), SimpleNamespace(pool=b, slot=2)
    seen = []
    for versions in ([on_a, on_b, None], [None, on_b, on_a]):
        hook.begin_step(versions, [1, 1, 1], torch.device("cpu"))
        pools = hook.per_token_pools()
        rows = {id(p): row.tolist() for p, row in zip(pools, hook.step_rows())}
        assert rows[id(a)] == [1 if v is on_a else -1 for v in versions]
        assert rows[id(b)] == [2 if v is on_b else -1 for v in versions]
        seen.append(KeyedGraphs.key(1, pools))
        hook.end_step()
    assert seen[0] == seen[1]


def test_decode_graph_loads_a_step_whose_tables_are_wider_than_its_own():
    """A device step's block-table rows are padded to 16k blocks (step_inputs.py), which can be
    wider than a decode graph's static tables (max_model_len / block_size): the padding past
    them is never read, and the load copies the columns the graph has."""
    from types import SimpleNamespace

    graphs = object.__new__(cuda_graphs.DecodeGraphs)
    i64 = dict(dtype=torch.long)
    graphs.input_ids, graphs.positions = torch.zeros(2, **i64), torch.zeros(2, **i64)
    graphs.slot_mapping, graphs.context_lens = torch.zeros(2, **i64), torch.zeros(2, **i64)
    graphs.block_tables = torch.zeros(2, 3, dtype=torch.int32)
    wide = torch.zeros(2, 16, dtype=torch.int32)
    wide[:, :3] = torch.tensor([[4, 5, 6], [7, 8, 0]])
    info = SimpleNamespace(slot_mapping=torch.tensor([9, 10]), context_lens=torch.tensor([40, 20]), block_tables=wide)
    graphs._load(2, 2, torch.tensor([1, 2]), torch.tensor([39, 19]), info, [], None)
    assert graphs.block_tables.tolist() == [[4, 5, 6], [7, 8, 0]] and graphs.context_lens.tolist() == [40, 20]
