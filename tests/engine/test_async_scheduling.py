"""Async scheduling (EngineConfig.async_scheduling): step n+1 is scheduled and launched before step
n's tokens are read back. On the CPU the same logic runs (the device work is just not in the
background), so these check its bookkeeping: tokens equal to transformers' greedy references and
to the step-by-step engine, no token past a stop ever emitted, every KV block returned, the prefix
cache left exactly as the step-by-step engine leaves it, aborts and preemption mid-flight.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from greedy_rule import matches_reference
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import PLACEHOLDER, Sequence
from nlora_serve.engine.runner.step_inputs import StepInputs
from nlora_serve.engine.sample.step_output import SampledStep

CASES = Path(__file__).parents[1] / "data" / "cases"
NEW = 12  # tokens per request (CI time): the references' first NEW tokens


def _matches(tokens: list[int], ref: dict) -> bool:
    """The README rule on the reference's first len(tokens) tokens (at least one)."""
    n = len(tokens)
    return n >= 1 and matches_reference(tokens, ref["greedy_token_ids"][:n], ref["top2_logit_margins"][:n])


def _core(base, overlap: bool, num_blocks: int = 64, budget: int = 64, max_model_len: int = 256) -> EngineCore:
    config = EngineConfig(async_scheduling=overlap,
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                                    max_model_len=max_model_len),
                          cache=CacheConfig(block_size=16, num_blocks=num_blocks))
    return EngineCore(config, base)


def _run(core: EngineCore, jobs: list[tuple[list[int], SamplingParams]]) -> tuple[dict, list[list]]:
    """Add every job, step until idle; returns each request's deltas and the deltas of every step."""
    for i, (ids, params) in enumerate(jobs):
        core.add(f"r{i}", ids, params)
    deltas: dict[str, list] = {f"r{i}": [] for i in range(len(jobs))}
    steps = []
    while core.has_work():
        outs = core.step()
        steps.append(outs)
        for out in outs:
            deltas[out.request_id].append(out)
    return deltas, steps


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, min_tokens=kw.pop("min_tokens", max_tokens), temperature=0.0, **kw)


def test_config_default_is_off_on_the_cpu_and_validated():
    assert EngineConfig(device="cpu").async_scheduling is False
    assert EngineConfig(device="cpu", async_scheduling=True).async_scheduling is True
    with pytest.raises(ValueError, match="async_scheduling must be True, False or None; got 'yes'"):
        EngineConfig(device="cpu", async_scheduling="yes")


def test_a_placeholder_takes_the_step_in_flights_token_on_the_device():
    inputs = StepInputs(block_size=4, decode_splits=1, device=torch.device("cpu"), gather_layout=False)
    seqs = [Sequence("a", 0, [5, 6, 7, PLACEHOLDER], 3, SamplingParams()),  # decodes its placeholder
            Sequence("b", 1, [8, 9], 2, SamplingParams()),  # decodes a known token
            Sequence("c", 2, [1, 2, 3, 4, PLACEHOLDER], 4, SamplingParams())]  # a prefill ending in one
    seqs[0].num_computed_tokens, seqs[1].num_computed_tokens = 3, 1
    for seq in seqs:
        seq.block_table = [0, 1]
    previous = SampledStep([], [], torch.tensor([70, 71, 72]), torch.zeros(0), None, [], 0, {},
                           {id(seqs[0]): 2, id(seqs[2]): 0}, False)
    pairs = [(seqs[0], 1), (seqs[1], 1), (seqs[2], 5)]
    input_ids, positions, _, _ = inputs.build(pairs, [], previous)
    assert input_ids.tolist() == [72, 9, 1, 2, 3, 4, 70]
    assert positions.tolist() == [3, 1, 0, 1, 2, 3, 4]


def test_greedy_tokens_equal_transformers_and_the_step_by_step_engine(base_fp32, base_greedy):
    jobs = [(ref["prompt_token_ids"], _greedy(NEW)) for ref in base_greedy]
    jobs += [(base_greedy[0]["prompt_token_ids"], _greedy(1)), (base_greedy[1]["prompt_token_ids"], _greedy(7))]
    got = {}
    for overlap in (False, True):
        core = _core(base_fp32, overlap, budget=32)  # 37/38-token prompts: chunked prefill
        deltas, _ = _run(core, jobs)
        got[overlap] = [[t for d in deltas[f"r{i}"] for t in d.token_ids] for i in range(len(jobs))]
        assert core.stats()["kv_blocks_used"] == 0 and not core.requests
    for ref, tokens in zip(base_greedy, got[True]):
        assert len(tokens) == NEW and _matches(tokens, ref)
    assert got[True][2] == base_greedy[0]["greedy_token_ids"][:1] and len(got[True][3]) == 7
    assert got[True] == got[False]


def test_no_token_past_a_stop_is_emitted_and_the_cache_ends_as_step_by_step(base_fp32, base_greedy):
    prompt, want = base_greedy[0]["prompt_token_ids"], base_greedy[0]["greedy_token_ids"]
    jobs = [(prompt, _greedy(NEW, min_tokens=0, stop_token_ids=(want[4],), ignore_eos=True)),  # stop id at 5
            (prompt, _greedy(NEW, min_tokens=0, ignore_eos=True)),
            (base_greedy[1]["prompt_token_ids"], _greedy(3))]  # length at 3
    results = {}
    for overlap in (False, True):
        core = _core(base_fp32, overlap)
        deltas, steps = _run(core, jobs)
        for rid, ds in deltas.items():  # exactly one last delta, and it is the last one
            assert [d.finished for d in ds] == [False] * (len(ds) - 1) + [True], rid
            assert ds[-1].completion_tokens == sum(len(d.token_ids) for d in ds)
        stop_at = want.index(want[4]) + 1  # the first occurrence of the stop id ends it
        assert [t for d in deltas["r0"] for t in d.token_ids] == want[:stop_at]
        assert deltas["r0"][-1].finish_reason == "stop"
        assert len([t for d in deltas["r2"] for t in d.token_ids]) == 3
        assert core.stats()["kv_blocks_used"] == 0
        assert (steps[0] == []) is overlap  # async: the first step's tokens come out of the second call
        results[overlap] = (sorted(core.blocks._cached), [[(o.request_id, o.token_ids) for o in s] for s in steps],
                            core.counters["computed_tokens"])
    assert results[True][0] == results[False][0]  # the same blocks published, same hashes
    # one token computed and dropped: r0's step after its stop; the length ends were never scheduled
    assert results[True][2] == results[False][2] + 1
    emitted = {o: [x for s in results[o][1] for x in s] for o in (False, True)}
    assert emitted[True] == emitted[False]  # the same deltas in the same order


def test_abort_while_a_step_is_in_flight_returns_its_blocks_and_spares_the_others(base_fp32, base_greedy):
    prompt, want = base_greedy[0]["prompt_token_ids"], base_greedy[0]["greedy_token_ids"]
    core = _core(base_fp32, True)
    core.add("victim", prompt, _greedy(NEW))
    core.add("other", prompt, _greedy(NEW))
    seen = []
    while len(seen) < 6:
        seen += [o for o in core.step() if o.request_id == "victim"]
    assert core._inflight is not None  # a step that computed for the victim is on its way
    last = core.abort("victim")
    assert last.finish_reason == "abort" and last.completion_tokens == len(seen)
    assert [t for o in seen for t in o.token_ids] == want[:len(seen)]
    rest = []
    while core.has_work():
        outs = core.step()
        assert all(o.request_id == "other" for o in outs)  # the victim's in-flight token is dropped
        rest += outs
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == NEW
    assert core.stats()["kv_blocks_used"] == 0


def test_preemption_under_a_tiny_cache_keeps_every_reference(base_fp32, base_greedy):
    # 7 blocks of 16 tokens for four sequences of ~53 tokens (4 blocks each): the newest running
    # one is preempted when the oldest grows into its fourth block, and recomputes later
    jobs = [(ref["prompt_token_ids"], _greedy(16)) for ref in base_greedy] * 2
    core = _core(base_fp32, True, num_blocks=7, budget=64, max_model_len=64)
    deltas, _ = _run(core, jobs)
    assert core.stats()["preemptions"] >= 1 and core.stats()["kv_blocks_used"] == 0
    for i, (ids, _) in enumerate(jobs):
        ref = base_greedy[i % 2]
        tokens = [t for d in deltas[f"r{i}"] for t in d.token_ids]
        assert len(tokens) == 16 and _matches(tokens, ref), i


def test_adapters_tied_and_lora_mixed_equal_their_references(base_fp32, tmp_path):
    names = ["inttune-nystrom-tied", "lora-rslora", "nlora-reference-format"]
    config = EngineConfig(async_scheduling=True, adapter_dir=str(tmp_path / "store"),
                          scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128, max_model_len=256),
                          cache=CacheConfig(num_blocks=128))
    core = EngineCore(config, base_fp32)
    jobs = []
    for name in names:
        core.adapters.register_dir(name, CASES / name)
        for ref in json.loads((CASES / name / "case.json").read_text())["references"]:
            jobs.append((name, ref))
    jobs.append((None, json.loads((CASES / "BASE_GREEDY.json").read_text())["references"][0]))
    for i, (name, ref) in enumerate(jobs):
        pinned = core.adapters.acquire(name) if name else None
        core.add(f"r{i}", ref["prompt_token_ids"], _greedy(NEW), pinned)
    got: dict[str, list[int]] = {}
    while core.has_work():
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
    for i, (name, ref) in enumerate(jobs):
        assert len(got[f"r{i}"]) == NEW and _matches(got[f"r{i}"], ref), name
    assert all(v.refcount == 0 for v in core.adapters.versions())


def test_penalties_seeds_and_logprobs_equal_the_step_by_step_engine(base_fp32, base_greedy, hf_model):
    # penalties read the token values: those steps settle before the next is scheduled
    prompt = base_greedy[0]["prompt_token_ids"]
    jobs = [(prompt, SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=2.0)),
            (prompt, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)),
            (prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=3))]
    got = {}
    for overlap in (False, True):
        deltas, _ = _run(_core(base_fp32, overlap), jobs)
        got[overlap] = [([t for d in deltas[f"r{i}"] for t in d.token_ids],
                         [lp for d in deltas[f"r{i}"] for lp in d.logprobs or []]) for i in range(len(jobs))]
    with torch.inference_mode():  # transformers' RepetitionPenaltyLogitsProcessor is the same rule
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, repetition_penalty=2.0,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert got[True][0][0] == want and want != base_greedy[0]["greedy_token_ids"][:len(want)]
    assert [g[0] for g in got[True]] == [g[0] for g in got[False]]
    for (expect, got_lp) in zip(got[False][2][1], got[True][2][1]):
        assert set(expect) == set(got_lp) and len(expect) in (3, 4)
        assert all(abs(expect[t] - got_lp[t]) < 1e-6 for t in expect)


def test_warm_up_after_the_last_request_ended_with_a_step_in_flight(base_fp32):
    from nlora_serve.engine.runner.warmup import warm_up

    core = _core(base_fp32, True)
    core.add("a", [1, 9690, 198], _greedy(4))
    core.step()
    assert core.abort("a").finish_reason == "abort" and core._inflight is not None
    report = warm_up(core)  # settles the orphan step first instead of refusing a busy engine
    assert report.step_tokens and not core.has_work() and core.stats()["kv_blocks_used"] == 0


def test_serve_flags_turn_it_on_and_off():
    import argparse

    from nlora_serve.serving.commands.engine_flags import add_device_arguments, device_config

    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=256)
    for flags, want in (([], False), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        config = device_config(parser.parse_args(["--device", "cpu", *flags]))
        assert config.async_scheduling is want, flags


def test_sampling_never_reads_a_device_value_and_packs_one_read_back():
    """On a GPU the host must not wait between launching a step and reading its tokens back: no op
    of sample_step may turn a tensor into a host value (``_local_scalar_dense`` is what ``item``,
    ``bool`` and ``int`` of a tensor dispatch; ``nonzero`` has a data-dependent shape)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nlora_serve.engine.sample.step_output import sample_step

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    logits[1, 4] = float("nan")
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=3, min_tokens=2, logprobs=0)]
    seqs = [Sequence(str(i), i, [1, 2], 2, p, torch.Generator().manual_seed(3) if p.seed else None)
            for i, p in enumerate(params)]
    raw = logits.clone()
    with Ops() as ops:
        step = sample_step(logits, [(s, 1) for s in seqs], seqs, [{7}] * 3, torch.Generator().manual_seed(0))
    assert ops.names and not {"_local_scalar_dense", "nonzero", "item"} & set(ops.names)
    tokens, finite, logprobs = step.read()
    assert finite == [True, False, True]
    assert tokens[0] == int(raw[0].argmax()) and tokens[2] != 7 and logprobs[1] is None
    want = raw.double().log_softmax(-1)  # the model's distribution, before penalties and temperature
    top = want[0].topk(2)
    assert set(logprobs[0][0]) == {tokens[0], *top.indices.tolist()}
    assert all(abs(logprobs[0][0][t] - float(want[0, t])) < 1e-5 for t in logprobs[0][0])
    assert list(logprobs[2][0]) == [tokens[2]] and abs(logprobs[2][0][tokens[2]] - float(want[2, tokens[2]])) < 1e-5
