"""A request whose LoRA finds every --max-loras slot held waits in the engine and runs when one
frees (vLLM queues it: its scheduler skips a waiting request whose LoRA would exceed max_loras);
it was refused with PoolFull (HTTP 429 pool_full) at once. The order in which waiting requests
take a freed slot is the policy's: arrival with fcfs, the least-served tenant first with fair (so
one tenant's backlog does not keep another out); an abort while waiting leaves nothing pinned."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from greedy_rule import matches_reference
from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.engine import step_thread
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams

CASES = Path(__file__).parents[1] / "data" / "cases"
LONG = SamplingParams(max_tokens=900, ignore_eos=True, temperature=0.0)  # holds its slot until aborted


def engine_of(base, tmp_path, policy: str = "fcfs") -> LLMEngine:
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024,
                                                    policy=policy),
                          cache=CacheConfig(num_blocks=256), adapter_dir=str(tmp_path / "store"),
                          adapter_limits=AdapterLimits(max_loras=1))
    return LLMEngine(config, base)


def reference(case: str) -> tuple[list[int], SamplingParams, dict]:
    ref = json.loads((CASES / case / "case.json").read_text())["references"][0]
    n = len(ref["greedy_token_ids"])
    return ref["prompt_token_ids"], SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0), ref


async def until(check, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def collect(stream, events: list, label: str) -> list[int]:
    tokens = []
    async for out in stream:
        if not tokens and out.token_ids:
            events.append(("first", label))
        tokens += out.token_ids
        assert out.finish_reason in (None, "length"), (label, out)
    events.append(("done", label))
    return tokens


def test_a_request_waits_for_the_lora_slot_and_answers_its_reference(base_fp32, tmp_path):
    """--max-loras 1, a request on adapter A runs: one on B waits (counted as waiting, pinned
    against freeing, no slot), then answers B's greedy reference once A's ends; nothing is refused."""
    engine = engine_of(base_fp32, tmp_path)
    try:
        a = engine.adapters.register_dir("a", CASES / "lora-rslora")
        b = engine.adapters.register_dir("b", CASES / "lora-layers-subset")
        prompt, params, ref = reference("lora-layers-subset")

        async def run():
            held = engine.add_request("Once upon a time", LONG, adapter="a", tenant="ann")
            await held.__anext__()  # a runs on the one slot
            waiting = engine.add_request(prompt, params, adapter="b", tenant="ben")
            task = asyncio.ensure_future(collect(waiting, [], "b"))
            await until(lambda: engine.stats()["waiting"] == 1)
            await asyncio.sleep(0.3)  # steps of a's run by meanwhile
            assert not task.done() and b.slot is None and b.refcount == 1
            assert engine.adapters.requests_of(b, "ben") == 1  # queued: counted for its tenant
            await held.aclose()
            return await task

        tokens = asyncio.run(run())
        assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"])
        assert (a.refcount, b.refcount, engine.stats()["waiting"], engine.stats()["running"]) == (0, 0, 0, 0)
    finally:
        engine.shutdown()


def test_a_hold_let_go_with_no_step_running_places_the_waiting_request_at_once(base_fp32, tmp_path, monkeypatch):
    """--max-loras 1: a response's hold keeps adapter A's slot (its requests still to be queued),
    no request runs, so no step does; a request on B waits. Letting the hold go wakes the engine,
    which queues B's request at once: within 50 ms, its cold load aside (3-15 ms measured on a
    loaded 2-core box). The idle engine's own retry (it polled every 50 ms) is put off to 60 s
    here: only the wake can place it in time."""
    monkeypatch.setattr(step_thread, "IDLE_RETRY_SECONDS", 60.0)
    engine = engine_of(base_fp32, tmp_path)
    try:
        engine.adapters.register_dir("a", CASES / "lora-rslora")
        b = engine.adapters.register_dir("b", CASES / "lora-layers-subset")
        pinned = engine.adapters.acquire("a", "ann")  # A takes the one slot (B's evicted) ...
        held = engine.adapters.hold("a", 1)
        engine.adapters.release(pinned, "ann")  # ... and keeps it for the response's requests to come
        queued, at = threading.Event(), []
        add = engine.core.add

        def core_add(*args):  # on the step thread: the waiting request placed and queued
            at.append((time.perf_counter(), residency.cold_load_seconds))
            queued.set()
            return add(*args)

        residency = engine.adapters.residency
        monkeypatch.setattr(engine.core, "add", core_add)
        prompt, params, _ = reference("lora-layers-subset")

        async def run() -> float:
            waiting = engine.add_request(prompt, params, adapter="b", tenant="ben")
            await until(lambda: engine.stats()["waiting"] == 1)
            assert not queued.is_set() and b.slot is None and engine.stats()["running"] == 0
            loaded = residency.cold_load_seconds
            start = time.perf_counter()
            engine.adapters.let_go(held)
            assert queued.wait(10)
            (end, loaded_by_then), = at
            await waiting.aclose()
            await until(lambda: b.refcount == 0 and engine.stats()["running"] == engine.stats()["waiting"] == 0)
            return end - start - (loaded_by_then - loaded)

        delay = asyncio.run(run())
        assert 0 <= delay < 0.05, delay
        assert b.slot is not None and b.holds == 0 and residency.cold_loads >= 1
    finally:
        engine.shutdown()


@pytest.mark.parametrize("how", ["close", "abort", "unload"])
def test_a_request_ended_while_it_waits_for_a_slot_leaves_nothing_pinned(base_fp32, tmp_path, how):
    """Its consumer leaving, an abort with a reason and a forced unload of its adapter each end a
    waiting request at once; its version's refcount and its tenant's count fall back to 0, and the
    slot it never had goes to the next request (B's reference)."""
    from nlora_serve.engine.api import RequestAborted

    engine = engine_of(base_fp32, tmp_path)
    try:
        a = engine.adapters.register_dir("a", CASES / "lora-rslora")
        b = engine.adapters.register_dir("b", CASES / "lora-layers-subset")
        prompt, params, ref = reference("lora-layers-subset")

        async def run():
            held = engine.add_request("Once upon a time", LONG, adapter="a", tenant="ann")
            await held.__anext__()
            waiting = engine.add_request(prompt, params, adapter="b", tenant="ben")
            await until(lambda: engine.stats()["waiting"] == 1)
            if how == "close":
                await waiting.aclose()
            elif how == "abort":
                engine.abort(waiting.request_id, "stopped by the test")
                with pytest.raises(RequestAborted, match="^stopped by the test$"):
                    await waiting.__anext__()
            else:
                engine.unload_adapter("b", force=True)
                with pytest.raises(RequestAborted, match=r"^adapter 'b' v1 was unloaded by an operator"):
                    await waiting.__anext__()
            await until(lambda: engine.stats()["waiting"] == 0 and b.refcount == 0)
            assert engine.adapters.requests_of(b, "ben") == 0 and b.slot is None
            await held.aclose()
            await until(lambda: a.refcount == 0 and engine.stats()["running"] == 0)
            if how == "unload":
                return None
            return await collect(engine.add_request(prompt, params, adapter="b", tenant="ben"), [], "b")

        tokens = asyncio.run(run())
        if tokens is not None:
            assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"])
        assert (a.refcount, b.refcount, engine.stats()["waiting"]) == (0, 0, 0)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_waiting_requests_take_a_freed_slot_in_the_policys_order(base_fp32, tmp_path, policy):
    """--max-loras 1: bob's request on bob-a runs; two more of bob's on bob-b, then carol's on
    carol-a, wait. bob-a's ends. fcfs: bob-b's two (arrived first) take the slot and carol waits
    for them to end. fair: carol, served nothing yet, takes it first (bob's backlog does not keep
    her out), and bob-b's wait for her. Every answer is its adapter's greedy reference."""
    engine = engine_of(base_fp32, tmp_path, policy)
    try:
        engine.adapters.register_dir("bob-a", CASES / "lora-rslora")
        engine.adapters.register_dir("bob-b", CASES / "lora-layers-subset")
        engine.adapters.register_dir("carol-a", CASES / "lora-bias")
        bob_prompt, bob_params, bob_ref = reference("lora-layers-subset")
        carol_prompt, carol_params, carol_ref = reference("lora-bias")
        events: list = []

        async def run():
            held = engine.add_request("Once upon a time", LONG, adapter="bob-a", tenant="bob")
            await held.__anext__()
            bob = [asyncio.ensure_future(collect(engine.add_request(bob_prompt, bob_params, adapter="bob-b",
                                                                    tenant="bob"), events, f"bob{i}"))
                   for i in range(2)]
            await until(lambda: engine.stats()["waiting"] == 2)
            carol = asyncio.ensure_future(collect(engine.add_request(carol_prompt, carol_params, adapter="carol-a",
                                                                     tenant="carol"), events, "carol"))
            await until(lambda: engine.stats()["waiting"] == 3)
            await held.aclose()
            return await asyncio.gather(*bob), await carol

        (bob0, bob1), carol = asyncio.run(run())
        for tokens, ref in ((bob0, bob_ref), (bob1, bob_ref), (carol, carol_ref)):
            assert matches_reference(tokens, ref["greedy_token_ids"], ref["top2_logit_margins"])
        if policy == "fcfs":
            assert events.index(("first", "carol")) > max(events.index(("done", "bob0")), events.index(("done", "bob1")))
        else:
            assert events.index(("done", "carol")) < min(events.index(("first", "bob0")), events.index(("first", "bob1")))
        assert engine.stats()["waiting"] == 0
    finally:
        engine.shutdown()
