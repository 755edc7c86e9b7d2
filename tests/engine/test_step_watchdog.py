"""The engine-step watchdog (engine/step_watchdog.py): a step that hangs makes the engine dead, found
from another thread; a slow step that ends within the limit does not."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nlora_serve.engine.api import EngineDead, RequestAborted
from nlora_serve.engine.config import DEFAULT_STEP_TIMEOUT_S, EngineConfig
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.step_watchdog import StepWatchdog
from nlora_serve.serving.commands.serve import _watch_engine
from nlora_serve.serving.health_state import health_answer

LIMIT_S = 0.3  # the engines' patched limit: a tiny one, so that a hang is found at once


class Clock:
    """A fake monotonic clock, seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_step_past_the_limit_is_found_by_a_reader_while_it_runs_and_sticks():
    clock = Clock()
    dog = StepWatchdog(300.0, clock)
    with dog.timing():
        clock.now += 300.0  # at the limit: not past it
        assert dog.reason() is None and dog.in_step
        clock.now += 12.0
        assert dog.reason() == "an engine step has run for 312.0 s (limit 300 s, --engine-step-timeout)"
    assert not dog.in_step
    with dog.timing():  # later steps within the limit do not bring it back
        pass
    assert dog.reason() == "an engine step has run for 312.0 s (limit 300 s, --engine-step-timeout)"


def test_a_step_that_ended_past_the_limit_trips_it_unread_and_zero_is_no_limit():
    clock = Clock()
    dog, off = StepWatchdog(300.0, clock), StepWatchdog(0, clock)
    for d in (dog, off):
        with d.timing():
            clock.now += 400.0
    assert "has run for 400.0 s (limit 300 s" in dog.reason() and off.reason() is None
    clock.now += 1e6  # between steps no time counts
    assert StepWatchdog(300.0, clock).reason() is None


def test_a_step_that_ends_in_time_while_a_reader_looks_does_not_trip_it():
    """The reader took the start stamp, then the step ended within the limit before the reader's
    clock read came back late (a descheduled watcher): not a hang."""
    clock = Clock()
    dog = StepWatchdog(300.0, clock)
    with dog.timing():
        clock.now += 100.0

        def late() -> float:  # the reader's clock read: meanwhile the step ended, at +100 s
            dog._started = None
            return clock.now + 400.0

        dog._clock = late
        assert dog.reason() is None
        dog._clock = clock
    assert dog.reason() is None


def test_stuck_is_the_running_step_past_the_limit_not_an_earlier_trip():
    clock = Clock()
    dog = StepWatchdog(300.0, clock)
    with dog.timing():
        clock.now += 400.0  # a slow step that ends: the engine is dead, its thread not stuck
    assert dog.reason() is not None and not dog.stuck()
    with dog.timing():
        clock.now += 100.0
        assert not dog.stuck()
        clock.now += 250.0
        assert dog.stuck()
    assert not StepWatchdog(0, clock).stuck()


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), True, "60"])
def test_a_bad_limit_is_refused_naming_the_flag(value):
    with pytest.raises(ValueError, match=r"step_timeout_s \(--engine-step-timeout\) must be a number of seconds"):
        EngineConfig(device="cpu", step_timeout_s=value)


def test_the_default_limit_is_the_devices():
    assert EngineConfig(device="cpu").step_timeout_s == DEFAULT_STEP_TIMEOUT_S["cpu"] == 1800.0
    assert EngineConfig(device="cpu", step_timeout_s=0).step_timeout_s == 0


def _patch_step(engine, before) -> None:
    real = engine.core.step

    def step():
        before()
        return real()

    engine.core.step = step


def test_a_hung_step_makes_the_engine_dead_health_503_and_new_requests_refused(make_engine):
    """The step thread blocks in a step (a deadlocked kernel, faked by an Event): nothing on it can
    report, yet the engine's watcher finds it dead past the limit, /health turns 503, serve's
    watcher stops the server, new requests are refused, the drain's abort reaches the stuck
    request's client, and shutdown does not wait for ever."""
    engine = make_engine(num_blocks=16, max_model_len=64, max_num_batched_tokens=64)
    engine.step_thread.watchdog.limit_s = LIMIT_S
    entered, release = threading.Event(), threading.Event()
    _patch_step(engine, lambda: (entered.set(), release.wait(30)))

    async def scenario():
        stream = engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
        assert await asyncio.to_thread(entered.wait, 10)
        assert engine.dead_reason is None  # within the limit it is not hung yet
        stop = asyncio.Event()
        await asyncio.wait_for(_watch_engine(engine, stop, every=0.05), 5)
        assert stop.is_set()
        with pytest.raises(EngineDead):
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
        engine.abort_all("the drain ended")  # the server's drain: the stuck thread cannot deliver it
        with pytest.raises(RequestAborted, match="the drain ended"):
            await asyncio.wait_for(anext(aiter(stream)), 5)

    try:
        asyncio.run(scenario())
        assert engine.dead_reason.startswith("an engine step has run for ")
        assert "(limit 0.3 s, --engine-step-timeout)" in engine.dead_reason
        assert health_answer(engine.dead_reason, False) == (503, {"status": "dead", "reason": engine.dead_reason})
        started = time.monotonic()
        engine.shutdown()  # the step is still stuck: it returns without the thread
        assert time.monotonic() - started < 1 and engine.step_thread_alive()
    finally:
        release.set()
    engine.step_thread_alive(10)


def test_a_slow_step_within_the_limit_does_not_trip_it(make_engine):
    engine = make_engine(num_blocks=16, max_model_len=64, max_num_batched_tokens=64)
    engine.step_thread.watchdog.limit_s = 2.0
    _patch_step(engine, lambda: time.sleep(LIMIT_S))  # each step slower than the other test's limit
    [out] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=1))
    assert len(out.token_ids) == 1 and engine.dead_reason is None


def test_generate_on_a_hung_step_raises_engine_dead_rather_than_waiting_for_ever(make_engine):
    """The blocking generate() (bench, offline use) waited on an Event only the stuck step thread
    could set: it returned once the step did, or never. Past the limit it raises EngineDead."""
    engine = make_engine(num_blocks=16, max_model_len=64, max_num_batched_tokens=64)
    engine.step_thread.watchdog.limit_s = LIMIT_S
    release = threading.Event()
    _patch_step(engine, lambda: release.wait(8))  # the safety: the step ends by itself after 8 s
    started = time.monotonic()
    try:
        with pytest.raises(EngineDead, match=r"an engine step has run for .* \(limit 0.3 s"):
            engine.generate([[1, 2, 3]], SamplingParams(max_tokens=1))
        assert time.monotonic() - started < 4
    finally:
        release.set()


def test_after_a_slow_step_tripped_it_abort_all_still_goes_through_the_step_thread(make_engine):
    """A step that ended past the limit leaves the engine dead for good, but its step thread serves
    on: the drain's abort_all took the hung path (streams ended from the caller's thread) whenever a
    later, healthy step was running, so the core never aborted its requests (they ran on, holding
    their KV blocks, while that thread delivered to the same sinks) and shutdown left the thread
    mid-step. Only a step running past the limit now is a hung thread."""
    engine = make_engine(num_blocks=16, max_model_len=64, max_num_batched_tokens=64)
    engine.step_thread.watchdog.limit_s = LIMIT_S
    steps, entered, gate = [], threading.Event(), threading.Event()

    def before():
        steps.append(1)
        if len(steps) == 1:
            time.sleep(LIMIT_S + 0.1)  # the first step ends past the limit: tripped, not stuck
        elif len(steps) == 2:
            entered.set()
            gate.wait(5)

    _patch_step(engine, before)
    aborted, real_abort = [], engine.core.abort
    engine.core.abort = lambda rid, reason=None: (aborted.append(reason), real_abort(rid, reason))[1]

    async def scenario():
        stream = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
        assert await asyncio.to_thread(entered.wait, 10)
        assert engine.dead_reason is not None and engine.step_thread.watchdog.in_step
        engine.abort_all("the drain ended")
        gate.set()
        with pytest.raises(RequestAborted, match="the drain ended"):
            async for _ in stream:
                pass

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gate.set()
    assert aborted == ["the drain ended"] and not engine.core.requests


def test_serve_ends_the_drain_at_once_when_the_engine_is_dead(monkeypatch):
    """No request can finish on a dead engine (a hung step, a failed device): the drain waited the
    whole --drain-seconds (30 s by default) before aborting, and telling, the requests a stuck step
    held, delaying the exit and its restart by as much. A fake server, no engine."""
    from types import SimpleNamespace

    from nlora_serve.serving.commands import serve as serve_cli

    calls = []

    async def start():
        pass

    async def shutdown(grace=None, now=None):
        calls.append(now is not None and now.is_set())
        return False

    server = SimpleNamespace(
        start=start, shutdown=shutdown, reload_tenants_soon=lambda: None,
        engine=SimpleNamespace(dead_reason="an engine step has run for 301.0 s"),
        generation=SimpleNamespace(auth=SimpleNamespace(enabled=True)),
        config=SimpleNamespace(host="127.0.0.1", drain_seconds=30.0), admission=SimpleNamespace(inflight=1))
    monkeypatch.setattr(serve_cli, "ready_lines", lambda server, adapters: [])
    assert asyncio.run(asyncio.wait_for(serve_cli.serve(server, []), 5)) is False
    assert calls == [True]


def _run_serve_on(monkeypatch, serve_cli, engine, serving, exit_now, join_seconds: float) -> None:
    """Patch the serve command so that run_serve builds ``engine``, serves with ``serving`` and exits
    through ``exit_now``, a stuck thread joined for ``join_seconds``."""
    monkeypatch.setattr(serve_cli, "build", lambda args, flags: (engine, object(), [], None))
    monkeypatch.setattr(serve_cli, "serve", serving)
    monkeypatch.setattr(serve_cli, "freeze_startup_heap", lambda: None)
    monkeypatch.setattr(serve_cli, "exit_now", exit_now)
    monkeypatch.setattr(serve_cli, "STUCK_STEP_JOIN_SECONDS", join_seconds)


def test_serve_exits_at_once_past_a_step_thread_stuck_in_its_step(make_engine, monkeypatch, caplog):
    """A hung step's thread never returns: serve drained and returned 1, but the interpreter's exit
    could then wait behind that thread (its exit hooks join thread-pool workers that wait on the
    step; CUDA's teardown, a hung kernel): no exit, no restart. Now a dead engine whose step thread
    is still in its step ends the process with exit_now (os._exit; tests/test_exit_now.py)."""
    import argparse
    import logging

    from nlora_serve.serving.commands import serve as serve_cli

    engine = make_engine(num_blocks=16, max_model_len=64, max_num_batched_tokens=64)
    engine.step_thread.watchdog.limit_s = LIMIT_S
    entered, release = threading.Event(), threading.Event()
    _patch_step(engine, lambda: (entered.set(), release.wait(30)))
    exits = []

    def exit_now(code, why):
        exits.append((code, why))
        raise SystemExit(code)

    async def serving(server, adapters, batch):  # the server ran until the watcher found the engine dead
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
        assert await asyncio.to_thread(entered.wait, 10)
        while engine.dead_reason is None:
            await asyncio.sleep(0.05)
        return False

    _run_serve_on(monkeypatch, serve_cli, engine, serving, exit_now, join_seconds=0.05)
    try:
        with caplog.at_level(logging.ERROR, logger="nlora_serve"), pytest.raises(SystemExit):
            serve_cli.run_serve(argparse.Namespace(backend="native"))
        assert exits == [(1, "the engine's step thread is still in its hung step")]
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("exiting with status 1")] == \
            [f"exiting with status 1: the engine died ({engine.dead_reason})"]
    finally:
        release.set()
    engine.step_thread_alive(10)


def test_serve_on_a_dead_engine_exits_past_an_admin_call_stuck_in_the_loops_executor(monkeypatch):
    """asyncio.run (3.11) joins its default executor's threads without a time limit as the loop
    closes: an admin call in asyncio.to_thread that waits on the hung step (or a store's fsync) held
    the process there, before run_serve's exit_now. Now a dead engine's loop waits
    STUCK_STEP_JOIN_SECONDS for them, then the process exits at once naming the thread. No engine."""
    import argparse
    from types import SimpleNamespace

    from nlora_serve.serving.commands import serve as serve_cli

    called, blocked, exits = threading.Event(), threading.Event(), []
    engine = SimpleNamespace(dead_reason=None, shutdown=lambda: None)

    def exit_now(code, why):
        exits.append((code, why))
        raise SystemExit(code)

    def admin_call():
        called.set()
        blocked.wait()

    async def serving(server, adapters, batch):  # an admin call handed to its thread, then the engine died
        asyncio.ensure_future(asyncio.to_thread(admin_call))
        # in its thread (not only queued: the close would cancel a queued one, and no thread would be busy)
        while not called.is_set():
            await asyncio.sleep(0.01)
        engine.dead_reason = "an engine step has run for 2.0 s (limit 1 s, --engine-step-timeout)"
        return False

    _run_serve_on(monkeypatch, serve_cli, engine, serving, exit_now, join_seconds=0.1)
    freed = threading.Timer(5.0, blocked.set)  # before: the close waited for the call, freed here
    freed.start()
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit):
            serve_cli.run_serve(argparse.Namespace(backend="vllm"))
        assert time.monotonic() - started < 3, "the loop's close waited for the stuck admin call"
        assert exits == [(1, "the event loop's worker threads asyncio_0 are still in their calls")]
    finally:
        freed.cancel()
        blocked.set()


def test_generate_cli_on_a_hung_step_says_so_and_exits_past_the_stuck_thread(base_fp32, base_model_dir,
                                                                              monkeypatch, capsys):
    """`nlora-serve generate` read its stream until the last token: a hung step's never came, and
    nothing looked at the watchdog: the command waited for ever. It now ends with the engine's
    death as its error line, and exits past the step thread still stuck (exit_now). That line names
    --engine-step-timeout, which was serve's flag alone: generate takes it too now."""
    import argparse

    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.serving.commands import generate as generate_cli
    from nlora_serve.serving.commands.generate_flags import add_generate_arguments

    release, engines, exits = threading.Event(), [], []

    def hung_engine(config, base):
        engine = LLMEngine(config, base)  # its limit from --engine-step-timeout
        _patch_step(engine, lambda: release.wait(30))
        engines.append(engine)
        return engine

    def exit_now(code, why, log):
        exits.append((code, why))
        raise SystemExit(code)

    monkeypatch.setattr(generate_cli, "load_base", lambda *args, **kwargs: base_fp32)
    monkeypatch.setattr(generate_cli, "LLMEngine", hung_engine)
    monkeypatch.setattr(generate_cli, "exit_now", exit_now)
    monkeypatch.setattr(generate_cli, "DEAD_POLL_SECONDS", 0.05)
    monkeypatch.setattr(generate_cli, "STUCK_STEP_JOIN_SECONDS", 0.05)
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args(["--model", str(base_model_dir), "--prompt", "Hi", "--max-tokens", "2", "--dtype",
                              "float32", "--max-model-len", "64", "--kv-cache-memory-bytes", "4M",
                              "--engine-step-timeout", str(LIMIT_S)])
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit):
            generate_cli.run_generate(args)
        assert time.monotonic() - started < 20
        assert exits == [(2, "the engine's step thread is still in its hung step")]
        err = capsys.readouterr().err.splitlines()
        assert [line for line in err if line.startswith("error: ")] == \
            [f"error: the engine is dead: {engines[0].dead_reason}"], err
        # the reason names the flag that set the limit: generate's own since it has one (serve-only before)
        assert engines[0].dead_reason.endswith(f"(limit {LIMIT_S:g} s, --engine-step-timeout)")
    finally:
        release.set()
    engines[0].step_thread_alive(10)
