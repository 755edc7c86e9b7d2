"""Piecewise CUDA graphs of prefill and mixed steps, checked on the CPU (issue 18).

The engine's CUDA path runs on CPU tensors (Triton under the interpreter); its pieces are captured
through the CPU seam (:class:`EagerCapture`: replay re-runs the piece on the same static buffers)
with :class:`GraphSafetyMode` around capture and every replay, which fails on syncing or
data-dependent ops and on reads of tensors at addresses the capture did not read. Workload: the
base model, tied and LoRA tenants in one batch, a prompt longer than the step budget (chunked
prefill), and a step that mixes decodes with a chunk over cached context; tenants registered after
capture grow the tied pool and allocate LoRA tables. Greedy tokens must equal transformers on
merged weights, and the same engine with every graph off.
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
from nlora_serve.engine.runner import piecewise_graphs  # noqa: E402
from nlora_serve.engine.api import EngineError  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.runner.cuda_graphs import EagerCapture  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.runner.piecewise_graphs import PIECEWISE_SIZES, piecewise_sizes  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402

RANK, ALPHA, NEW, BUDGET = 8, 16.0, 3, 32
# step 1: 3 + 5 + the first 24 tokens of the 35-token prompt (32, chunked); step 2: two decodes,
# the last 11 tokens over 24 cached ones and the 6-token prompt (19 tokens: bucket 32)
LENGTHS = (3, 5, 35, 6)


def test_buckets():
    assert piecewise_sizes(2048) == PIECEWISE_SIZES == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert piecewise_sizes(64) == (16, 32, 64) and piecewise_sizes(100) == (16, 32, 64, 100)
    assert piecewise_sizes(8192) == PIECEWISE_SIZES  # larger steps run eagerly
    assert piecewise_sizes(10) == (10,)


def test_config_flag():
    assert EngineConfig(device="cpu").piecewise_graphs is False  # off until a GPU run confirms it
    with pytest.raises(ValueError, match="piecewise_graphs"):
        EngineConfig(device="cpu", piecewise_graphs="yes")


def test_serve_flag():
    import argparse

    from nlora_serve.serving.commands.engine_flags import add_device_arguments, device_config

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=256)
    for flags, want in (([], False), (["--piecewise-graphs"], True), (["--no-piecewise-graphs"], False)):
        assert device_config(parser.parse_args(["--device", "cpu", *flags])).piecewise_graphs is want, flags


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, base_model_dir):
    return (*graph_tenants(tmp_path_factory.mktemp("tiny"), RANK, ALPHA), base_model_dir)


def _engine(tiny, tmp_path) -> LLMEngine:
    model_dir, _, _, tokenizer_dir = tiny
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", kernel_backend="triton",
                          async_scheduling=False, adapter_dir=str(tmp_path / "store"), enable_prefix_caching=False,
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=BUDGET, max_model_len=80),
                          cache=CacheConfig(block_size=16, num_blocks=40))
    return LLMEngine(config)


def _prompts(seed: int, lengths: tuple[int, ...] = LENGTHS) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in lengths]


def _generate(engine, prompts, names) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)
    return [o.token_ids for o in engine.generate(prompts, params, names)]


def _check_reference(tiny, prompts, names, got) -> None:
    _, model, tenants, _ = tiny
    for name, prompt, tokens in zip(names, prompts, got):
        want, margins = hf_greedy(model if name is None else tenants[name][1], prompt, NEW)
        assert matches_reference(tokens, want, margins), (name, tokens, want)


def test_pieces_safe_and_equal_to_eager_and_transformers(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(TiedPool.__init__, "__defaults__", (1, None))  # one slot: the 2nd tied tenant grows it
    capture = EagerCapture(check=True)
    # (adapters, seed, prompt lengths); the base round: one 26-token prefill step (bucket 32)
    rounds = [([None] * 3, 0, (5, 9, 12)), (["tied", "lora_attn", None, "tied"], 1, LENGTHS),
              (["tied2", "lora_all", "lora_attn", None], 2, LENGTHS)]
    got = []
    with _engine(tiny, tmp_path) as engine:
        runner = engine.core.runner
        runner.enable_graphs(8, capture, capture_now=True, piecewise_tokens=BUDGET)
        assert sorted(k for k in runner.pieces.graphs) == [(16, ()), (32, ())]  # base pieces, start-up
        # the base pieces (captured with no adapter layout), replayed with the adapter hook installed
        got.append(_generate(engine, _prompts(0, rounds[0][2]), rounds[0][0]))
        for name in ("tied", "lora_attn"):
            engine.adapters.register_dir(name, tiny[2][name][0])
        got.append(_generate(engine, _prompts(1, LENGTHS), rounds[1][0]))
        first = set(runner.pieces.graphs)
        # after capture: the tied pool grows (new N tensor), the LoRA pool allocates MLP tables
        for name in ("tied2", "lora_all"):
            engine.adapters.register_dir(name, tiny[2][name][0])
        got.append(_generate(engine, _prompts(2, LENGTHS), rounds[2][0]))
        stats = engine.stats()
        recaptured = set(runner.pieces.graphs) - first
        # every step replayed a graph: piecewise 1 + 2 + 2 (see LENGTHS), the rest decodes
        assert stats["eager_steps"] == 0 and stats["piecewise_steps"] == 5 and stats["graph_steps"] >= 3 * (NEW - 1)
        assert runner.pieces.replayed == 5 and all(size == 32 for size, _ in recaptured) and recaptured
        # eager: the same engine with every graph off (and the adapters' segment form at prefill)
        runner.graphs = runner.pieces = None
        runner.set_adapter_hook(engine.core.hook)
        eager = [_generate(engine, _prompts(seed, lengths), names) for names, seed, lengths in rounds]
        assert engine.stats()["eager_steps"] > 0 and engine.core.hook.per_token_tokens == 0
    # capture.replays counts decode graphs too; every replay of a piece ran under the safety check
    # (ops and Triton launches of the step, 1,910 here; the Triton interpreter's own torch calls
    # inside a launch are not counted)
    assert capture.checked_ops > 1500
    assert got == eager
    for (names, seed, lengths), tokens in zip(rounds, got):
        _check_reference(tiny, _prompts(seed, lengths), names, tokens)


def test_stale_pieces_are_caught(tiny, tmp_path, monkeypatch, caplog):
    """The check has teeth: keying pieces without the pools' generations replays a stale piece."""
    monkeypatch.setattr(TiedPool.__init__, "__defaults__", (1, None))
    monkeypatch.setattr(piecewise_graphs.PiecewiseGraphs, "key",
                        staticmethod(lambda size, pools: (size, tuple((id(p), 0) for p in pools))))
    monkeypatch.setattr(piecewise_graphs.PiecewiseGraphs, "drop_stale", lambda self: None)  # nor dropped at a step's start
    with _engine(tiny, tmp_path) as engine:
        engine.core.runner.enable_graphs(8, EagerCapture(check=True), piecewise_tokens=BUDGET)
        engine.adapters.register_dir("tied", tiny[2]["tied"][0])
        _generate(engine, [[5, 6, 7, 8]], ["tied"])
        engine.adapters.register_dir("tied2", tiny[2]["tied2"][0])
        with pytest.raises(EngineError, match=r"the engine failed while running this request"):
            _generate(engine, [[5, 6, 7, 9]], ["tied2"])
    # the cause reaches the server's log, not the client
    assert re.search("GraphSafetyError: .* address the capture did not read", caplog.text)
