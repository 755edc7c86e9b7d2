"""The vLLM engine's own bookkeeping, with vLLM's AsyncLLM replaced by a recorder (runs in CI).

A hot-swap racing client cancels killed vLLM's engine core (a hostile tester's find): a version's
folder was deleted while vLLM could still load it, and an abort between a job's check and its
start let it run unpinned. These pin the order that prevents both. The served path itself is in
tests/vllm_backend (where vllm is importable).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from types import SimpleNamespace

import grpc
import pytest

from nlora_serve.engine.api import ENGINE_DEAD_MESSAGE, EngineDead, RequestIds
from nlora_serve.engine.vllm_backend import engine as engine_module
from nlora_serve.engine.vllm_backend.engine import VllmEngine
from nlora_serve.engine.vllm_backend.outputs import Job
from nlora_serve.serving.status import http_status_of, status_of
from nlora_serve.serving.commands.serve import _watch_engine


V1 = SimpleNamespace(name="a", version=1, content_hash="h", slot=5)  # the adapter version a job pins


class _Pins:
    def __init__(self):
        self.released = []

    def release(self, version, tenant=None):
        self.released.append(version)


class _Folds:
    """The engine's FoldCache as a recorder: which versions' folders requests used and gave back."""

    def __init__(self):
        self.calls = []
        self.remove = self.root = None  # what drop hands a freed version's folder to, and where they are

    async def use(self, version):
        self.calls.append(("use", version.slot))

    def done(self, lora_id):
        self.calls.append(("done", lora_id))

    async def drop(self, lora_id):
        self.calls.append(("drop", lora_id))
        await self.remove(lora_id, self.root / str(lora_id))  # FoldCache.drop of a version with no folder entry


def _engine(llm=None) -> VllmEngine:
    """A VllmEngine with its bookkeeping only: no vLLM, its loop in a thread."""
    engine = VllmEngine.__new__(VllmEngine)
    engine._lock, engine._jobs, engine._ids = threading.Lock(), {}, RequestIds()
    engine._adapters, engine._stopping, engine._dead, engine._llm = _Pins(), False, None, llm
    engine._base_lora, engine._fold_cache, engine._gate = None, _Folds(), None
    engine._loop = asyncio.new_event_loop()
    engine._thread = threading.Thread(target=engine._loop.run_forever, daemon=True)
    engine._thread.start()
    return engine


def _job(engine: VllmEngine, delivered: list) -> Job:
    client_id, rid = engine._ids.admit(None)
    job = engine._jobs[rid] = Job(rid, client_id, 3, pinned=V1, sink=delivered.append, future=Future())
    return job


def test_an_abort_before_the_start_ends_the_job_and_it_never_reaches_vllm():
    class NeverCalled:
        def generate(self, *args, **kwargs):
            raise AssertionError("an aborted job reached vLLM")

    engine, delivered = _engine(NeverCalled()), []
    try:
        job = _job(engine, delivered)
        engine._abort(job.rid, "unloaded")
        assert job.ended and engine._adapters.released == [V1] and delivered[-1].error == "unloaded"
        asyncio.run_coroutine_threadsafe(engine._run(job, [1, 2, 3], None, None), engine._loop).result(5)
        assert engine._adapters.released == [V1] and len(delivered) == 1  # released once, never started
        assert engine._fold_cache.calls == []  # and never folded
    finally:
        engine._stop_loop()


def test_an_abort_of_a_started_job_keeps_its_pin_until_vllm_has_aborted_it():
    engine, delivered = _engine(), []
    try:
        job = _job(engine, delivered)
        job.started = True  # its task runs on the vLLM loop: only cancelling it lets vLLM abort it first
        engine._abort(job.rid, None)
        assert job.future.cancelled() and not job.ended and engine._adapters.released == [] and delivered == []
    finally:
        engine._stop_loop()


def test_a_freed_version_is_removed_from_vllm_before_its_folder_goes(tmp_path):
    seen = []

    class Llm:
        async def remove_lora(self, lora_id):
            await asyncio.sleep(0.05)  # answered between vLLM's steps: it may still read the folder
            seen.append((lora_id, folder.is_dir()))
            return True

    folder = tmp_path / "7"
    folder.mkdir()
    engine = _engine(Llm())
    engine._fold_cache.remove, engine._fold_cache.root = engine._remove_lora, tmp_path
    try:
        engine._drop_lora(7, folder)
        assert folder.is_dir()  # not deleted on the freeing thread
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.2), engine._loop).result(5)
        assert seen == [(7, True)] and not folder.exists() and engine._fold_cache.calls == [("drop", 7)]
    finally:
        engine._stop_loop()


def test_a_dead_engine_still_has_its_folders_removed(tmp_path):
    class DeadLlm:
        async def remove_lora(self, lora_id):
            raise RuntimeError("EngineDeadError")

    folder = tmp_path / "8"
    folder.mkdir()
    engine = _engine(DeadLlm())
    try:
        asyncio.run_coroutine_threadsafe(engine._remove_lora(8, folder), engine._loop).result(5)
        assert not folder.exists()
    finally:
        engine._stop_loop()


def test_a_vllm_whose_core_died_reports_it_and_the_server_stops():
    class Llm:
        errored = False

    engine = _engine(Llm())
    try:
        assert engine.dead_reason is None
        engine._llm.errored = True
        assert "vLLM's engine core died" in engine.dead_reason

        async def watch():
            stop = asyncio.Event()
            await asyncio.wait_for(_watch_engine(engine, stop, every=0.01), 2)
            return stop.is_set()

        assert asyncio.run(watch())
    finally:
        engine._stop_loop()


def test_a_failure_while_vllm_is_alive_fails_one_request_only(monkeypatch, caplog):
    """The client reads that the engine failed, not vLLM's text, which may hold the fold folder's
    paths and other adapters' names (a LoRA load failure); the server's log has it."""
    monkeypatch.setattr(engine_module, "vllm_sampling_params", lambda params, tenant=None: params)

    class Llm:
        errored = False

        def generate(self, *args, **kwargs):
            raise RuntimeError("boom: /tmp/nlora-folds-x/17 of 'other-tenant-lora'")

    engine, delivered = _engine(Llm()), []
    engine._lora_request = lambda pinned: None  # vLLM's LoRARequest is not importable here
    try:
        job = _job(engine, delivered)
        asyncio.run_coroutine_threadsafe(engine._run(job, [1], None, None), engine._loop).result(5)
        assert delivered[-1].finish_reason == "error"
        assert delivered[-1].error == "the engine failed while running this request (the server's log has the cause)"
        assert "failed in vLLM: RuntimeError: boom: /tmp/nlora-folds-x/17 of 'other-tenant-lora'" in caplog.text
        assert engine.dead_reason is None
        assert engine._fold_cache.calls == [("use", 5), ("done", 5)]  # its folder may go now
    finally:
        engine._stop_loop()


def test_a_core_death_tells_running_clients_what_to_do_and_refuses_new_requests_with_503(monkeypatch):
    # vLLM's own text after a death is "EngineCore encountered an issue. See stack trace (above) for
    # the root cause.": the stack trace is in the server's log, not the client's; the cause goes to
    # the log and /health, the client reads that the server is going and to retry elsewhere.
    monkeypatch.setattr(engine_module, "vllm_sampling_params", lambda params, tenant=None: params)

    class EngineDeadError(Exception):
        pass

    class Llm:
        errored = False

        def generate(self, *args, **kwargs):
            self.errored = True
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")

    engine, delivered = _engine(Llm()), []
    engine._lora_request = lambda pinned: None  # vLLM's LoRARequest is not importable here
    try:
        job = _job(engine, delivered)
        asyncio.run_coroutine_threadsafe(engine._run(job, [1], None, None), engine._loop).result(5)
        assert delivered[-1].finish_reason == "error" and delivered[-1].error == ENGINE_DEAD_MESSAGE
        assert "EngineDeadError: EngineCore encountered an issue" in engine.dead_reason  # for the operator

        async def admit():
            return engine.add_request([1, 2, 3])

        with pytest.raises(EngineDead, match="retry on another replica") as refused:
            asyncio.run(admit())
        assert status_of(refused.value) == (grpc.StatusCode.UNAVAILABLE, "engine_dead")
        assert http_status_of(refused.value)[0] == 503
        assert engine._jobs == {}  # nothing was queued
    finally:
        engine._stop_loop()
