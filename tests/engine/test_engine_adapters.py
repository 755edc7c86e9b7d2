"""The engine with adapters: every accept case in one mixed batch, pins, swaps, unloads, refcounts."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch

from greedy_rule import matches_reference
from nlora_serve.adapters.runtime.version import AdapterNotFound
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.api import EngineError, RequestAborted
from nlora_serve.engine.sample.sampling import SamplingParams

CASES = Path(__file__).parents[1] / "data" / "cases"
ACCEPT = sorted(d.name for d in CASES.iterdir()
                if d.is_dir() and json.loads((d / "case.json").read_text())["expect"] == "accept")
ASYNC = pytest.mark.parametrize("engine", [False, True], ids=["sync", "async"], indirect=True)
GREEDY_24 = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)  # references suppress EOS


@pytest.fixture(params=[False], ids=["sync"])
def engine(base_fp32, tmp_path, request):
    """The engine step by step; ``ASYNC`` below runs a test with async scheduling too."""
    config = EngineConfig(async_scheduling=request.param, scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=256),
                          cache=CacheConfig(num_blocks=512), adapter_dir=str(tmp_path / "store"))
    with LLMEngine(config, base_fp32) as eng:
        yield eng


def test_every_accept_case_and_the_base_model_in_one_shuffled_batch(engine):
    assert len(ACCEPT) >= 8
    jobs = []
    for name in ACCEPT:
        engine.adapters.register_dir(name, CASES / name)
        refs = json.loads((CASES / name / "case.json").read_text())["references"]
        jobs += [(name, ref) for ref in refs]
    jobs += [(None, ref) for ref in json.loads((CASES / "BASE_GREEDY.json").read_text())["references"]]
    random.Random(7).shuffle(jobs)
    outs = engine.generate([ref["prompt_token_ids"] for _, ref in jobs], GREEDY_24, [n for n, _ in jobs])
    for (name, ref), out in zip(jobs, outs):
        assert matches_reference(out.token_ids, ref["greedy_token_ids"], ref["top2_logit_margins"]), name
        assert (out.adapter, out.adapter_version) == ((name, 1) if name else (None, 0))
        # the merged output keeps the version's content hash (it was dropped: "" for every adapter)
        assert out.adapter_hash == (engine.adapters.registry.get(name).content_hash if name else "")
    assert all(len(v.content_hash) == 64 for v in engine.adapters.versions())  # sha256 hex: never ""
    assert all(v.refcount == 0 for v in engine.adapters.versions())
    tied = engine.adapters.registry.get("inttune-nystrom-tied")
    assert tied.is_tied and tied.held_bytes == 30 * 3 * 8 * 8 * 4  # N only: sites · r² · fp32
    stored = AdapterFiles(tied.path)
    assert set(stored.weights) == {k for k in stored.weights if k.endswith("lora_N.weight")}


class AdapterFiles:
    def __init__(self, path: Path):
        self.config = json.loads((path / "adapter_config.json").read_text())
        self.weights = safetensors.torch.load_file(path / "adapter_model.safetensors")


def _chat(engine, text):
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)


@ASYNC
def test_hot_swap_keeps_in_flight_requests_on_their_version(engine):
    name = "inttune-nystrom-tied"
    v1 = engine.adapters.register_dir(name, CASES / name)
    files = AdapterFiles(v1.path)
    new_n = {k: (t * 1.5).contiguous() for k, t in files.weights.items()}
    long_run = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def scenario():
        stream = engine.add_request(_chat(engine, "Tell me a story."), long_run, adapter=name)
        seen = [await anext(stream)]
        v2 = engine.adapters.swap(name, safetensors.torch.save(new_n), if_version=1)
        after = [o async for o in engine.add_request(_chat(engine, "Hi"), GREEDY_24, adapter=name)]
        seen += [o async for o in stream]
        return v2, seen, after

    v2, seen, after = asyncio.run(scenario())
    assert v2.version == 2 and v2.content_hash != v1.content_hash
    assert {o.adapter_version for o in seen} == {1} and len(seen) == 40
    assert {o.adapter_version for o in after} == {2}
    assert v1.freed and v1.refcount == 0 and v1.slot is None  # released when its request ended
    assert v2.pool.used == 1


def test_unknown_adapter_is_not_found_and_nothing_is_disturbed(engine):
    with pytest.raises(AdapterNotFound, match="'nobody' is not registered"):
        engine.generate([[1, 2, 3]], GREEDY_24, ["nobody"])
    out = engine.generate([[1, 9690, 198]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].token_ids) == 3 and engine.stats()["kv_blocks_used"] == 0


@ASYNC
def test_abort_error_and_forced_unload_release_every_pin(engine, monkeypatch, caplog):
    name = "lora-rslora"
    engine.adapters.register_dir(name, CASES / name)
    long_run = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def abort_one():
        stream = engine.add_request(_chat(engine, "Count."), long_run, request_id="a", adapter=name)
        async for out in stream:
            if out.completion_tokens == 2:
                engine.abort("a")
        return out

    assert asyncio.run(abort_one()).finish_reason == "abort"
    version = engine.adapters.registry.get(name)
    assert version.refcount == 0

    async def forced_unload():
        stream = engine.add_request(_chat(engine, "Count."), long_run, adapter=name)
        await anext(stream)
        assert version.refcount == 1
        engine.unload_adapter(name, force=True)
        return [o async for o in stream]

    with pytest.raises(RequestAborted) as err:  # the stream says why, not a bare "abort"
        asyncio.run(forced_unload())
    assert str(err.value).startswith(f"adapter '{name}' v{version.version} was unloaded by an operator")
    assert version.refcount == 0 and version.freed and version.slot is None

    engine.adapters.register_dir(name, CASES / name)
    fresh = engine.adapters.registry.get(name)
    monkeypatch.setattr(engine.core.runner, "execute", _boom)
    with pytest.raises(EngineError, match="the engine failed while running this request"):
        engine.generate([_chat(engine, "Hi")], GREEDY_24, [name])
    assert "injected step failure" in caplog.text  # the cause: the server's log's, not the client's
    assert fresh.refcount == 0


def test_a_forced_unload_between_a_requests_pin_and_its_queueing_aborts_it(engine, monkeypatch):
    """A request pins its version on the caller's thread, then queues itself for the step thread;
    a forced unload whose abort reaches the step thread in between found nothing of the adapter
    to abort, and the request, admitted before the unload, ran to its end (here all 200 tokens).
    It is aborted like the requests already running, naming the version, its pin released."""
    name = "lora-rslora"
    engine.adapters.register_dir(name, CASES / name)
    version = engine.adapters.registry.get(name)
    admit = engine._ids.admit

    def admit_after_a_forced_unload(client_id):  # the pin is taken, the request not yet queued
        engine.unload_adapter(name, force=True)
        return admit(client_id)

    monkeypatch.setattr(engine._ids, "admit", admit_after_a_forced_unload)

    async def run():
        stream = engine.add_request(_chat(engine, "Count."), SamplingParams(max_tokens=200, ignore_eos=True),
                                    adapter=name)
        return [o async for o in stream]

    with pytest.raises(RequestAborted) as err:
        asyncio.run(run())
    assert str(err.value) == (f"adapter '{name}' v{version.version} was unloaded by an operator (UnloadAdapter "
                              "force=true) while this request ran; the request was aborted")
    assert (version.refcount, version.freed, version.slot) == (0, True, None)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.adapters.holders(name) == 0


def _boom(pairs, previous=None, scored=None):
    raise RuntimeError("injected step failure")


@pytest.mark.parametrize("case", ["inttune-nystrom-tied", "lora-bias", "nlora-reference-format"])
def test_bf16_prefill_logits_with_an_adapter_close_to_fp32(base_fp32, tmp_path, case):
    from nlora_serve.adapters.runtime.manager import AdapterManager
    from nlora_serve.models import load_base
    from nlora_serve.engine.model.adapter_layer import AdapterHook
    from nlora_serve.engine.scheduling.block_manager import BlockManager
    from nlora_serve.engine.runner.model_runner import ModelRunner
    from nlora_serve.engine.scheduling.sequence import Sequence

    ids = json.loads((CASES / case / "case.json").read_text())["references"][0]["prompt_token_ids"]

    def logits(base):
        manager = AdapterManager(base, tmp_path / f"store-{base.dtype}")
        version = manager.acquire(manager.register_dir(case, CASES / case).name)
        runner, hook = ModelRunner(base, num_blocks=16, block_size=8, max_model_len=128), AdapterHook()
        runner.set_adapter_hook(hook)
        seq = Sequence("p", 0, list(ids), len(ids), GREEDY_24, adapter=version)
        BlockManager(16, 8).grow(seq.block_table, len(ids))
        hook.begin_step([version], [len(ids)], torch.device("cpu"))
        return runner.execute([(seq, len(ids))])[0]

    fp32 = logits(base_fp32)
    bf16 = logits(load_base(str(base_fp32.path), torch.bfloat16))
    assert float((bf16 - fp32).norm() / fp32.norm()) < 2e-2


@ASYNC
@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_logits_end_only_the_requests_they_belong_to(engine, monkeypatch, bad_value):
    # An adapter whose delta overflows mid-forward (inf -> NaN logits) ends its own request with
    # an error; the base-model request in the same batch goes on untouched. Any one non-finite
    # logit of the 49,152 counts, whichever sign.
    name = "lora-rslora"
    engine.adapters.register_dir(name, CASES / name)
    execute = engine.core.runner.execute

    def overflow(pairs, previous=None):
        logits = execute(pairs, previous)
        sampling = [seq for seq, n in pairs if seq.num_computed_tokens + n == seq.num_tokens]
        for row, seq in enumerate(sampling):
            if seq.adapter is not None:
                logits[row, 7] = bad_value
        return logits

    monkeypatch.setattr(engine.core.runner, "execute", overflow)
    prompt = _chat(engine, "Hi")

    async def both():
        bad = engine.add_request(prompt, GREEDY_24, adapter=name)
        good = engine.add_request(prompt, GREEDY_24)
        with pytest.raises(EngineError, match=r"logits on adapter 'lora-rslora' v1 are not finite"):
            async for _ in bad:
                pass
        return [o async for o in good]

    good = asyncio.run(both())
    assert good[-1].finish_reason == "length" and good[-1].completion_tokens == 24
    assert engine.adapters.registry.get(name).refcount == 0 and engine.stats()["kv_blocks_used"] == 0


def test_scaling_that_overflows_the_pool_dtype_is_refused_at_registration(engine, tmp_path):
    import shutil

    from nlora_serve.errors import AdapterError

    src = tmp_path / "overflow"
    shutil.copytree(CASES / "lora-bias", src)
    config = json.loads((src / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e40  # s = 2.5e39: over float32's max (3.4e38)
    (src / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"lora_alpha \(scaling 2.5e\+39\) at .*: scaling times N can reach "
                                            r"2.5e\+39, over the 3.39e\+38 that keeps the scaled N .* finite"):
        engine.adapters.register_dir("overflow", src)
    with pytest.raises(AdapterNotFound):
        engine.adapters.acquire("overflow")


def test_tiny_temperature_is_greedy():
    assert SamplingParams(temperature=1e-38).greedy and not SamplingParams(temperature=1e-3).greedy
