"""The engine's start-up warm-up (engine/runner/warmup.py), checked on the CPU (torch backend; one test on
the Triton path under the interpreter with the decode graphs' CPU seam).

On CUDA the engine warms up in its constructor; here it is called by hand on a tiny random Llama:
it must run the intended step shapes (hand-computed from the scheduler's rules) and leave no
trace: no requests, every KV block free, an empty prefix cache, counters at zero, and a request
afterwards still equal to transformers' greedy tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined (the triton-path test)

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from greedy_rule import matches_reference  # noqa: E402
from tiny_llama import hf_greedy, make_tiny_llama, random_factors, write_peft  # noqa: E402
from nlora_serve.adapters.runtime.version import AdapterNotFound  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.core import EngineCore  # noqa: E402
from nlora_serve.engine.runner.cuda_graphs import EagerCapture  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402
from nlora_serve.engine.runner.warmup import DUMMY_TOKEN, adapter_kinds, warm_up, warmup_rounds  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_model_dir):
    root = tmp_path_factory.mktemp("tiny-warmup")
    return root, make_tiny_llama(root), base_model_dir


def test_rounds_cover_one_multiples_of_16_others_and_a_chunked_prompt():
    assert warmup_rounds(2048, 192, 1000, 16) == [[1, 16, 17]]  # the budget never chunks a prompt here
    assert warmup_rounds(64, 128, 100, 16) == [[1, 16, 17], [81, 16]]  # 64-token chunk, then 17 over context
    assert warmup_rounds(64, 70, 100, 16) == [[1, 16, 17], [67, 16]]  # capped at max_model_len - 3
    assert warmup_rounds(8, 16, 1, 16) == [[1], [13]]  # one block: one request at a time, <= 13 tokens


def test_warm_up_runs_the_shapes_and_leaves_no_state(tiny):
    model_dir, model, tokenizer_dir = tiny
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", kernel_backend="torch",
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128),
                          cache=CacheConfig(block_size=16, num_blocks=32))
    core = EngineCore(config)
    assert core.warmup is None  # the constructor warms up on CUDA only
    report = warm_up(core)
    # round 1: prefills of 1 + 16 + 17 tokens in one step, then two decode steps of 3 sequences;
    # round 2: the 81-token prompt's first 64-token chunk, its last 17 with the 16-token prompt, 2 decodes
    assert report.step_tokens == [34, 3, 3, 64, 33, 2, 2]
    assert report.eager_steps == 7 and report.graph_steps == 0 and report.seconds > 0
    assert not core.requests and not core.has_work()
    assert core.blocks.num_free_blocks == core.blocks.num_blocks == 32
    assert core.blocks.num_cached_blocks == 0  # the dummy prompts' blocks are not in the prefix cache
    assert core.counters == dict.fromkeys(core.counters, 0) and core.runner.step_counts == {
        "graph_steps": 0, "piecewise_steps": 0, "eager_steps": 0, "graph_cap_eager_steps": 0, "graph_evictions": 0}
    # a request starting with the 16-token dummy prompt (one full block) finds nothing cached
    prompt = [DUMMY_TOKEN + 1] * 16 + [7, 300, 4000]
    core.add("r", prompt, SamplingParams(max_tokens=4, min_tokens=4, temperature=0.0))
    outs = []
    while core.has_work():
        outs += core.step()
    want, margins = hf_greedy(model, prompt, 4)
    assert outs[0].cached_tokens == 0
    assert matches_reference([t for o in outs for t in o.token_ids], want, margins)


def test_warm_up_refuses_a_busy_engine(tiny):
    model_dir, _, tokenizer_dir = tiny
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", kernel_backend="torch",
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(block_size=16, num_blocks=16))
    core = EngineCore(config)
    core.add("r", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up(core)
    assert list(core.requests) == ["r"] and core.has_work()  # untouched


def test_adapter_kinds_one_name_per_kind():
    def v(name, tied=False, family=None, flavour="lora"):
        return SimpleNamespace(name=name, is_tied=tied, family=family, flavour=flavour)

    versions = [v("a"), v("b"), v("t1", True, flavour="inttune-tied"), v("n1", flavour="nlora"),
                v("t2", True, flavour="inttune-tied"), v("f1", family="fam", flavour="nlora"), v("n2", flavour="nlora")]
    assert adapter_kinds(versions) == ("a", "t1", "n1", "f1")


def _lora_and_config(tiny, tmp_path):
    """A rank-4 PEFT LoRA folder of the tiny model and a CPU engine config with a 64-token budget."""
    model_dir, model, tokenizer_dir = tiny
    folder = write_peft(tmp_path / "lora", random_factors(model, rank=4, with_n=False, seed=3), rank=4, alpha=8.0)
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", kernel_backend="torch",
                          adapter_dir=str(tmp_path / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(block_size=16, num_blocks=16))
    return folder, config


def test_warm_up_on_an_adapter_pins_and_releases_it(tiny, tmp_path):
    folder, config = _lora_and_config(tiny, tmp_path)
    core = EngineCore(config)
    version = core.adapters.register_dir("lora", folder)
    acquire, pinned = core.adapters.acquire, []
    core.adapters.acquire = lambda name: pinned.append(name) or acquire(name)
    report = warm_up(core, adapter_kinds(core.adapters.versions()))
    assert pinned == ["lora"] * 4  # the up-front check, then every dummy request on the adapter
    assert report.step_tokens == [34, 3, 3]  # 61-token prompts fit the 64 budget: no chunked round
    assert version.refcount == 0 and not core.requests  # each dummy request's pin was released once
    # four kinds (here one name four times) outnumber round 1's three requests: the rounds run twice
    pinned.clear()
    assert warm_up(core, ("lora",) * 4).step_tokens == [34, 3, 3] * 2 and pinned == ["lora"] * 7


def test_llm_engine_warm_up_runs_on_its_step_thread(tiny, tmp_path):
    folder, config = _lora_and_config(tiny, tmp_path)
    with LLMEngine(config) as engine:
        engine.adapters.register_dir("lora", folder)
        assert engine.warm_up() is None  # off CUDA nothing runs unless names are given
        assert engine.warm_up(("lora",)).step_tokens == [34, 3, 3]
        with pytest.raises(AdapterNotFound):
            engine.warm_up(("lora", "nope"))  # refused before any dummy request is queued
        assert engine.stats()["steps"] == 0 and engine.stats()["kv_blocks_used"] == 0
        assert not engine.core.has_work() and engine.adapters.registry.holders("lora") == 0


@pytest.mark.parametrize("piecewise", [False, True], ids=["decode-graphs", "piecewise"])
def test_warm_up_replays_decode_graphs_on_the_triton_path(tiny, piecewise):
    """The CUDA start-up order on the CPU: base graphs captured (the CPU seam, graph-safety checked),
    then the warm-up, whose decodes of 3 sequences replay the size-4 graph (and, with piecewise
    graphs, whose 34-token prefill step replays the 3 pieces of the 2-layer model at bucket 64)."""
    model_dir, _, tokenizer_dir = tiny
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", kernel_backend="triton",
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(block_size=16, num_blocks=16))
    core = EngineCore(config)
    capture = EagerCapture(check=True)
    core.runner.enable_graphs(8, capture, capture_now=True, piecewise_tokens=64 if piecewise else 0)
    report = warm_up(core)
    assert report.step_tokens == [34, 3, 3] and report.graph_steps == 2
    assert (report.piecewise_steps, report.eager_steps) == ((1, 0) if piecewise else (0, 1))
    assert capture.replays == (5 if piecewise else 2) and capture.checked_ops > 0
    assert core.runner.graphs.replayed == 0 and core.runner.step_counts["graph_steps"] == 0
    assert core.blocks.num_free_blocks == 16
    # every graph (each decode size, each bucket's last piece) writes rows of one [8, V] logits buffer
    outputs = [g[1] for g in core.runner.graphs.graphs.values()]
    outputs += [p.logits for p in core.runner.pieces.graphs.values()] if piecewise else []
    assert len(outputs) == (4 + 3 if piecewise else 4)  # decode sizes 1, 2, 4, 8; buckets 16, 32, 64
    assert {t.untyped_storage().data_ptr() for t in outputs} == {core.runner.graphs.logits.data_ptr()}


def test_warm_up_runs_the_sampled_path_and_the_sampler_at_max_num_seqs_rows(tiny, monkeypatch):
    """One request per round samples with every option (its three steps filter one row), then the
    dummy sampler filters max_num_seqs = 8 rows of the whole vocabulary; the grammar bitmask only
    when asked (on CUDA by default). The engine still answers as transformers' greedy afterwards
    (test_warm_up_runs_the_shapes_and_leaves_no_state: the seed generator is reset)."""
    from nlora_serve.engine.runner import dummy_sampler
    from nlora_serve.engine.sample import sampling, step_output

    model_dir, model, tokenizer_dir = tiny
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", kernel_backend="torch",
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                          cache=CacheConfig(block_size=16, num_blocks=16))
    core = EngineCore(config)
    filtered, penalised, masked = [], [], []
    top_k_top_p, penalties = sampling.top_k_top_p_mask, step_output.apply_penalties
    monkeypatch.setattr(sampling, "top_k_top_p_mask", lambda x, k, p: filtered.append(tuple(x.shape)) or
                        top_k_top_p(x, k, p))
    monkeypatch.setattr(step_output, "apply_penalties", lambda row, *a: penalised.append(row.shape[0]) or
                        penalties(row, *a))
    monkeypatch.setattr(dummy_sampler, "mask_rows", lambda x, rows, matchers: masked.append((rows, matchers)))
    vocab = model.config.vocab_size
    report = warm_up(core)
    assert report.step_tokens == [34, 3, 3] and report.sampler_rows == 8
    assert filtered == [(1, vocab)] * 3 + [(8, vocab)] and penalised == [vocab] * (3 + 8) and masked == []
    assert not core.requests and core.blocks.num_free_blocks == 16
    warm_up(core, grammar_mask=True)
    assert masked == [(list(range(8)), [None] * 8)]



def test_adapter_warm_up_captures_every_graph_size_of_each_pool():
    """capture_adapter_graphs on fakes (the real KeyedGraphs keys): each named adapter's pool alone
    gets every decode size and piecewise bucket, largest first, except keys a warm-up step already
    captured; an adapter whose step is not graphable (the segment form) gets none; each name is
    pinned once and released. (On the real Triton path, interpreted, the same check took 25 s: run
    by hand, it left sizes 1, 2, 4, 8 of a LoRA pool with 3 captured here.)"""
    from nlora_serve.engine.runner.keyed_graphs import KeyedGraphs
    from nlora_serve.engine.runner.warmup import capture_adapter_graphs

    class Graphs(KeyedGraphs):
        def __init__(self, sizes):
            super().__init__()
            self.sizes, self.captured = sizes, []

        def _capture(self, size, pools, hook):
            self.captured.append((size, [p.name for p in pools]))

    pools = {n: SimpleNamespace(name=n, generation=g) for n, g in (("a", 0), ("b", 3), ("seg", 0))}
    versions = {n: SimpleNamespace(name=n, pool=p) for n, p in pools.items()}
    log = []

    class Hook:
        def begin_step(self, step_versions, lens, device):
            assert lens == [1]
            self.version = step_versions[0]

        def graphable(self):
            return self.version.name != "seg"

        def per_token_pools(self):
            return [self.version.pool]

        def end_step(self):
            log.append("end")

    adapters = SimpleNamespace(acquire=lambda n: log.append(f"+{n}") or versions[n],
                               release=lambda v: log.append(f"-{v.name}"))
    decode, pieces = Graphs((1, 2, 4, 8)), Graphs((16, 32, 64))
    decode.graph_for(4, [pools["a"]], None)  # a warm-up decode step's capture
    core = SimpleNamespace(runner=SimpleNamespace(graphs=decode, pieces=pieces), hook=Hook(), adapters=adapters,
                           device="cpu")
    assert capture_adapter_graphs(core, ("a", "b", "a", "seg")) == 3 + 3 + 4 + 3
    assert decode.captured == [(4, ["a"]), (8, ["a"]), (2, ["a"]), (1, ["a"])] + [(s, ["b"]) for s in (8, 4, 2, 1)]
    assert pieces.captured == [(s, [n]) for n in "ab" for s in (64, 32, 16)]
    assert log == ["+a", "end", "-a", "+b", "end", "-b", "+seg", "end", "-seg"]


def test_graphs_reading_a_dropped_pool_are_let_go_at_the_next_capture():
    """A graph holds the pools it reads: one of a pool its Residency dropped with its last adapter
    (``retired``) was kept for the runner's life, and the pool's memory with it. Graphs of live
    pools stay, whatever their size."""
    import gc
    import weakref

    from nlora_serve.engine.runner.keyed_graphs import KeyedGraphs

    class Graphs(KeyedGraphs):
        sizes = (1, 2, 4)

        def _capture(self, size, pools, hook):
            return (size, list(pools))  # as a real capture's closure does, it keeps its pools

    class Pool:
        def __init__(self, generation):
            self.generation, self.retired = generation, False

    graphs, a, b = Graphs(), Pool(11), Pool(12)
    for size, pools in ((1, [a]), (4, [a, b]), (4, [b]), (2, [])):
        graphs.graph_for(size, pools, None)
    gone = weakref.ref(a)
    a.retired = True
    del a
    graphs.graph_for(2, [b], None)
    gc.collect()
    assert gone() is None
    assert sorted(graphs.graphs) == sorted([(4, ((id(b), 12),)), (2, ()), (2, ((id(b), 12),))])
