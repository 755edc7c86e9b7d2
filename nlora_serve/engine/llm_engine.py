"""Our engine behind the :class:`~nlora_serve.engine.api.Engine` interface (DESIGN §5).

:class:`LLMEngine` runs our model runner, stepping in its own thread and handing deltas to
asyncio through ``loop.call_soon_threadsafe``; the vLLM-backed engine (§8) implements the same
interface in vllm_backend/engine.py.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Mapping

import torch
from transformers import AutoTokenizer

from nlora_serve.adapters.manager import AdapterManager
from nlora_serve.adapters.version import AdapterVersion, Hold
from nlora_serve.adapters.residency import SlotBusy
from nlora_serve.errors import AdapterError
from nlora_serve.models import BaseModel
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.api import (ENGINE_DEAD_MESSAGE, ENGINE_FAILED_MESSAGE, SHUTDOWN_REASON, Engine, EngineDead,
                                   EngineError, RequestIds, RequestStream, RequestOutput, max_prompt_bytes,
                                   prompt_ids)
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.inbox import Abort, AbortAdapter, AbortAll, AddRequest, SetWeights, WarmUp
from nlora_serve.engine.request_checks import unloaded_reason
from nlora_serve.engine.sampling import SamplingParams
from nlora_serve.engine.slot_wait import IDLE_RETRY_SECONDS, SlotWaiters
from nlora_serve.engine.step_watchdog import StepWatchdog
from nlora_serve.engine.structured import StructuredOutputs
from nlora_serve.engine.threads import engine_threads, on_device
from nlora_serve.engine.warmup import WarmupReport, adapter_kinds, warm_up

Sink = Callable[[RequestOutput], None]
log = logging.getLogger(__name__)


HUNG_POLL_SECONDS = 1.0  # how often a blocking call (generate, shutdown) looks for a hung step


class LLMEngine(Engine):
    """The native engine: :class:`EngineCore` stepped by one background thread."""

    def __init__(self, config: EngineConfig, base: BaseModel | None = None) -> None:
        self.core = EngineCore(config, base)
        # callers tokenize with their own instance: the step thread detokenizes with the core's
        self.tokenizer = AutoTokenizer.from_pretrained(self.core.tokenizer_path)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # by engine id: the core sees engine ids only
        self._wake = threading.Event()
        self._stopping = False
        self._ids = RequestIds()
        self._lock = threading.Lock()  # guards tokenizer use from caller threads
        self._max_prompt_bytes: int | None = None  # set on the first prompt (api.max_prompt_bytes)
        self._waiters = SlotWaiters(self.core.adapters)  # requests waiting for a LoRA slot (step thread's)
        if self.core.adapters is not None:  # a slot may free with no step running (a hold let go): try them then
            self.core.adapters.on_slot_change(self._wake.set)
        self._threads = engine_threads(config.cpu_threads)
        self._watchdog = StepWatchdog(self.core.config.step_timeout_s)  # start-up above is not timed
        self._thread = threading.Thread(target=self._loop, name="nlora-engine", daemon=True)
        self._thread.start()

    # -- submission ----------------------------------------------------------------------------

    @property
    def adapters(self) -> AdapterManager:
        """Adapter admin (register, swap, list). Raises AdapterError when no store is configured."""
        if self.core.adapters is None:
            raise AdapterError("this engine serves no adapters: start it with an adapter store (--adapter-dir)")
        return self.core.adapters

    @property
    def max_model_len(self) -> int:
        return self.core.config.scheduler.max_model_len

    @property
    def dead_reason(self) -> str | None:
        """See :attr:`Engine.dead_reason`. A failed step ends its requests and the engine serves on,
        unless the device itself failed (a sticky CUDA error: :attr:`EngineCore.device_error`), after
        which every step would fail while health said serving, or a step has run past
        ``EngineConfig.step_timeout_s`` (hung: engine/step_watchdog.py, read here, on the caller's
        thread, not the stuck one's); then the server aborts its requests, without a drain, and exits 1."""
        return self.core.device_error or self._watchdog.reason()

    def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if self._max_prompt_bytes is None:  # once: a pass over the vocabulary
            self._max_prompt_bytes = max_prompt_bytes(self.tokenizer, self.max_model_len)
        return prompt_ids(prompt, self.tokenizer, self._lock, self._max_prompt_bytes, add_special_tokens)

    def check_structured(self, spec: StructuredOutputs, tenant: str | None = None) -> None:
        """Compile a structured-output spec into the engine's cache and onto the spec, on the
        caller's thread (the front ends run it on a thread of their own, off the event loop and the
        tokenizer thread); ``tenant`` compiles one spec at a time.

        Raises:
            RequestError: the spec does not compile, or ``tenant`` has another compiling; ``param``
                is ``spec.param``.
        """
        self.core.check_structured(spec, tenant)

    def unload_adapter(self, name: str, force: bool = False) -> AdapterVersion:
        version = self.adapters.unload(name, force)
        if force:
            self._inbox.put(AbortAdapter(name))
            self._wake.set()
        return version

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        # the LoRA slots' shares at once (residency has its lock: requests take slots on callers'
        # threads); the scheduler's and the prefix cache's between steps, before any request
        # submitted after this call is added
        if self.core.adapters is not None:
            self.core.adapters.set_tenant_shares(weights)
        self._inbox.put(SetWeights(dict(weights)))
        self._wake.set()

    def _submit(self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None,
                sink: Sink, adapter: str | None = None, tenant: str | None = None,
                cache_salt: str | None = None, add_special_tokens: bool = True,
                held: Hold | None = None) -> tuple[str, str]:
        """Queue a request; returns its (client id, engine id)."""
        if self._stopping:
            raise EngineError("engine is shut down")
        if self.dead_reason is not None:
            raise EngineDead(ENGINE_DEAD_MESSAGE)
        params = params if params is not None else SamplingParams()
        ids = self.prompt_ids(prompt, add_special_tokens)
        self.core.validate(ids, params)
        pinned, placed = self._pin(adapter, tenant, held) if adapter is not None else (None, True)
        client_id, engine_id = self._ids.admit(request_id)
        self._sinks[engine_id] = sink
        self._inbox.put(AddRequest(engine_id, ids, params, pinned, tenant, cache_salt, placed))
        self._wake.set()
        return client_id, engine_id

    def _pin(self, adapter: str, tenant: str | None, held: Hold | None) -> tuple[AdapterVersion, bool]:
        """Reserve ``adapter`` for a request and place it now, unless requests already wait for a
        LoRA slot (they go first) or none is free: (the version, whether it is placed).

        Raises:
            AdapterNotFound, AdapterLoadFailed: as AdapterManager.acquire (nothing stays pinned).
        """
        pinned = self.adapters.reserve(adapter, tenant, held)
        if len(self._waiters):
            return pinned, False
        try:
            self.adapters.place(pinned, tenant)
        except SlotBusy:  # a slot frees when a request on one ends: it waits (engine/slot_wait.py)
            return pinned, False
        except BaseException:
            self.adapters.unreserve(pinned, tenant)
            raise
        return pinned, True

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None, tenant: str | None = None,
                    cache_salt: str | None = None, add_special_tokens: bool = True,
                    held: Hold | None = None) -> RequestStream:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        client_id, engine_id = self._submit(prompt, params, request_id,
                                            lambda out: loop.call_soon_threadsafe(deltas.put_nowait, out), adapter,
                                            tenant, cache_salt, add_special_tokens, held)
        return RequestStream(client_id, deltas, self._drop, engine_id)

    def _drop(self, engine_id: str) -> None:
        """The consumer went away: free the request's blocks and adapter pin, send it nothing."""
        self._sinks.pop(engine_id, None)
        self._ids.close(engine_id)
        self._abort(engine_id, None)

    def abort(self, request_id: str, reason: str | None = None) -> None:
        for engine_id in self._ids.engine_ids(request_id):
            self._abort(engine_id, reason)

    def abort_all(self, reason: str) -> None:
        if self._watchdog.stuck():
            # hung: the step thread will never read the inbox; end every stream from here, so that
            # the drain's clients are told rather than cut (the core is the stuck thread's: untouched)
            self._deliver([RequestOutput(eid, "", [], "abort", 0, 0, error=reason) for eid in list(self._sinks)])
            return
        self._inbox.put(AbortAll(reason))
        self._wake.set()

    def _abort(self, engine_id: str, reason: str | None) -> None:
        self._inbox.put(Abort(engine_id, reason))
        self._wake.set()

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion (blocking); one merged output per prompt, in order.
        ``adapters`` gives each prompt's adapter name (None = base model). A text prompt takes the
        tokenizer's special tokens, as :meth:`add_request`'s default and vLLM's ``LLM.generate``.

        Each result holds the whole text and token ids, the finish reason and usage.

        Raises:
            RequestError: a prompt or parameter set is invalid. EngineError: a step failed.
            EngineDead: the engine is dead (:attr:`dead_reason`) before the prompts were queued, or
                its step hung past ``EngineConfig.step_timeout_s`` while they ran.
        """
        plist = params if isinstance(params, list) else [params] * len(prompts)
        done = threading.Event()
        results: dict[str, list[RequestOutput]] = {}
        remaining = [len(prompts)]

        def collect(out: RequestOutput) -> None:
            results.setdefault(out.request_id, []).append(out)
            if out.finished:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        if not prompts:
            return []
        names = adapters if adapters is not None else [None] * len(prompts)
        rids = [self._submit(p, sp, None, collect, a)[0] for p, sp, a in zip(prompts, plist, names)]
        while not done.wait(HUNG_POLL_SECONDS):  # in slices: a hung step thread never sets it
            if self._watchdog.stuck():
                raise EngineDead(f"{ENGINE_DEAD_MESSAGE}: {self._watchdog.reason()}")
        merged = [_merge(results[rid]) for rid in rids]
        failed = next((m for m in merged if m.finish_reason == "error"), None)
        if failed is not None:
            raise EngineError(f"request {failed.request_id} failed: {failed.error}")
        return merged

    def warm_up(self, adapters: tuple[str, ...] | None = None) -> WarmupReport | None:
        """Run the start-up warm-up (engine/warmup.py) again on adapters, so their kernels compile
        and their graphs are captured before the first request on them (the constructor's warm-up
        ran before any adapter was registered). ``adapters``: the names to run on; None: on CUDA,
        one served adapter of each kind (LoRA, NLoRA, tied IntTune, family member), and nothing
        elsewhere. Blocks until done; returns None when there was nothing to run.

        Raises:
            RuntimeError: requests are running or waiting (call it at start, after registering).
            AdapterNotFound: a name given is not registered.
        """
        if adapters is None and self.core.device.type == "cuda" and self.core.adapters is not None:
            adapters = adapter_kinds(self.core.adapters.versions())
        if not adapters:
            return None
        names = tuple(adapters)
        done, result = threading.Event(), []
        self._inbox.put(WarmUp(names, done, result))
        self._wake.set()
        done.wait()
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    def stats(self) -> dict[str, int]:
        stats = self.core.stats()
        stats["waiting"] += len(self._waiters)  # those waiting for a LoRA slot are queued too
        return stats

    def shutdown(self) -> None:
        """Stop the step thread; requests still running end with finish_reason "abort" and
        :data:`SHUTDOWN_REASON` (their streams raise RequestAborted)."""
        self._stopping = True
        self._wake.set()
        while self._thread.is_alive():  # not for ever behind a hung step: the thread is a daemon, left behind
            if self._watchdog.stuck():
                log.error("the engine's step thread is stuck in a step; shutting down without it")
                return
            self._thread.join(timeout=HUNG_POLL_SECONDS)

    def step_thread_alive(self, wait_s: float = 0.0) -> bool:
        """Whether the step thread still runs after waiting up to ``wait_s`` seconds for it to end.
        After :meth:`shutdown`, only where a step hung: the thread is a daemon, left in its step, and
        the process must not wait for it (serve exits with ``os._exit``: commands/exit_now.py)."""
        self._thread.join(wait_s)
        return self._thread.is_alive()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the step thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        with on_device(self.core.device):  # the step thread's kernels and events on the engine's GPU
            self._serve()

    def _serve(self) -> None:
        torch.set_num_threads(self._threads)  # this thread's own count (engine/threads.py)
        while not self._stopping:
            try:
                self._drain_inbox()
                self._admit_waiting()
                if not self.core.has_work():
                    self._wake.wait(IDLE_RETRY_SECONDS if len(self._waiters) else None)
                    self._wake.clear()
                    continue
                with self._watchdog.timing():
                    outputs = self.core.step()
            except Exception:  # any failure ends every request; the step thread keeps serving
                log.exception("engine step failed; ending every running request")
                with self._watchdog.timing():  # it waits for the device, which may hang too
                    outputs = self.core.fail_all(ENGINE_FAILED_MESSAGE)  # the cause: the log's, not every tenant's
            self._deliver(outputs)
        self._drain_inbox()
        self._deliver([self.core.abort(rid, SHUTDOWN_REASON) for rid in list(self.core.requests)])
        self._deliver(self._end_waiting(lambda w: True, SHUTDOWN_REASON))

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            match msg:
                case AddRequest():
                    self._add(msg)
                case AbortAdapter():
                    self._deliver(self.core.abort_adapter(msg.name))
                    self._deliver(self._end_waiting(lambda w: w.pinned.name == msg.name, None, unloaded=True))
                case SetWeights():
                    self.core.set_tenant_weights(msg.weights)
                case WarmUp():  # on this thread, between steps: the core is not thread-safe
                    self._warm_up(msg)
                case AbortAll():  # after every AddRequest queued before it
                    self._deliver([self.core.abort(rid, msg.reason) for rid in list(self.core.requests)])
                    self._deliver(self._end_waiting(lambda w: True, msg.reason))
                case Abort():
                    out = self.core.abort(msg.engine_id, msg.reason)
                    if out is None:
                        self._deliver(self._end_waiting(lambda w: w.engine_id == msg.engine_id, msg.reason))
                    else:
                        self._deliver([out])
                case _:
                    raise TypeError(f"unknown engine inbox command {msg!r}")

    def _warm_up(self, cmd: WarmUp) -> None:
        try:
            cmd.result.append(warm_up(self.core, cmd.names))
        except Exception as exc:  # handed to the caller of warm_up
            cmd.result.append(exc)
        finally:
            cmd.done.set()

    def _admit_waiting(self) -> None:
        """Queue the requests waiting for a LoRA slot that can have one now (engine/slot_wait.py)."""
        if not len(self._waiters):
            return
        fair = self.core.scheduler.fair
        placed, failed = self._waiters.admit((lambda t: fair.counters.get(t, 0.0)) if fair is not None else None)
        for cmd in placed:
            self._start(cmd)
        self._deliver([_ended(cmd, "error", str(exc)) for cmd, exc in failed])

    def _end_waiting(self, match: Callable[[AddRequest], bool], reason: str | None,
                     unloaded: bool = False) -> list[RequestOutput]:
        """End the requests waiting for a LoRA slot that ``match`` selects, as aborted (``reason``;
        ``unloaded``: a forced unload's, naming the version)."""
        return [_ended(cmd, "abort", unloaded_reason(cmd.pinned) if unloaded else reason)
                for cmd in self._waiters.remove(match)]

    def _add(self, cmd: AddRequest) -> None:
        if cmd.pinned is not None and cmd.pinned.unloaded:
            # force-unloaded after it was pinned: its abort (AbortAdapter) ran before this request
            # was queued and missed it; it is aborted as the requests running or waiting then were
            (self.core.adapters.release if cmd.placed else self.core.adapters.unreserve)(cmd.pinned, cmd.tenant)
            self._deliver([_ended(cmd, "abort", unloaded_reason(cmd.pinned))])
            return
        if not cmd.placed:
            self._waiters.park(cmd)
        else:
            self._start(cmd)

    def _start(self, cmd: AddRequest) -> None:
        try:
            self.core.add(cmd.engine_id, cmd.ids, cmd.params, cmd.pinned, cmd.tenant, cmd.cache_salt)
        except Exception as exc:  # RequestError, or anything else: only this request fails
            if cmd.pinned is not None and cmd.engine_id not in self.core.requests:  # never queued: the pin is ours
                self.core.adapters.release(cmd.pinned, cmd.tenant)
            self._deliver([RequestOutput(cmd.engine_id, "", [], "error", len(cmd.ids), 0, error=str(exc))])

    def _deliver(self, outputs: list[RequestOutput | None]) -> None:
        """Hand each output to its request's sink, under the client's id (outputs of a request
        whose consumer left are dropped)."""
        for out in outputs:
            if out is None:
                continue
            engine_id = out.request_id
            sink, client_id = self._sinks.get(engine_id), self._ids.client(engine_id)
            if out.finished:
                self._sinks.pop(engine_id, None)
                self._ids.close(engine_id)
            if sink is None or client_id is None:
                continue
            out.request_id = client_id
            try:
                sink(out)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                self._sinks.pop(engine_id, None)
                self._ids.close(engine_id)


def _ended(cmd: AddRequest, reason: str, error: str | None) -> RequestOutput:
    """The last delta of a request that ended while it waited for a LoRA slot."""
    version = cmd.pinned
    return RequestOutput(cmd.engine_id, "", [], reason, len(cmd.ids), 0, error=error, adapter=version.name,
                         adapter_version=version.version, adapter_hash=version.content_hash)


def _merge(deltas: list[RequestOutput]) -> RequestOutput:
    last = deltas[-1]
    logprobs = [lp for d in deltas for lp in (d.logprobs or [])] or None
    return RequestOutput(last.request_id, "".join(d.text for d in deltas),
                         [t for d in deltas for t in d.token_ids], last.finish_reason,
                         last.prompt_tokens, last.completion_tokens, logprobs, last.error,
                         last.adapter, last.adapter_version, last.adapter_hash, cached_tokens=last.cached_tokens,
                         stop_reason=last.stop_reason,
                         prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), None))
