"""The native engine's step thread (DESIGN §5): one background thread that owns the
:class:`~nlora_serve.engine.core.EngineCore` and steps it.

Callers (:class:`~nlora_serve.engine.llm_engine.LLMEngine`, on the front ends' threads) never
touch the core's requests: they send commands (engine/inbox.py), which the thread runs between
steps in arrival order, and each request's outputs go to the sink the caller registered with it.
The thread also keeps the requests waiting for a LoRA slot (engine/slot_wait.py) and times every
step (engine/step_watchdog.py), so a hung step is found from any other thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

from nlora_serve.engine.api import ENGINE_FAILED_MESSAGE, SHUTDOWN_REASON, RequestIds, RequestOutput
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.inbox import Abort, AbortAdapter, AbortAll, AddRequest, SetWeights, WarmUp
from nlora_serve.engine.request_checks import unloaded_reason
from nlora_serve.engine.slot_wait import IDLE_RETRY_SECONDS, SlotWaiters
from nlora_serve.engine.step_watchdog import StepWatchdog
from nlora_serve.engine.threads import on_device
from nlora_serve.engine.runner.warmup import warm_up

Sink = Callable[[RequestOutput], None]  # takes a request's outputs, on the step thread (or abort_all's caller)
# the engine's log lines keep the logger name they had before this module was split out of it
log = logging.getLogger("nlora_serve.engine.llm_engine")

HUNG_POLL_SECONDS = 1.0  # how often a blocking call (generate, shutdown) looks for a hung step


class StepThread:
    """The step thread, started by the constructor: its inbox, the requests' sinks, the requests
    waiting for a LoRA slot (:attr:`waiters`) and the step :attr:`watchdog`.

    ``core``: the engine core; from now on only this thread calls its request methods.
    ``ids``: the engine's request ids, shared with the caller (outputs go out under the client's
    id; a finished request's are closed here). ``num_threads``: torch's CPU thread count for the
    thread (engine/threads.py). Start-up before the constructor is not timed by the watchdog.

    The methods below are the callers', safe from any thread; the rest run on the step thread.
    """

    def __init__(self, core: EngineCore, ids: RequestIds, num_threads: int) -> None:
        self.core = core
        self._ids = ids
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # by engine id: the core sees engine ids only
        self._wake = threading.Event()
        self._stopping = False
        self.waiters = SlotWaiters(core.adapters)  # requests waiting for a LoRA slot (this thread's; len from any)
        if core.adapters is not None:  # a slot may free with no step running (a hold let go): try them then
            core.adapters.on_slot_change(self._wake.set)
        self._num_threads = num_threads
        self.watchdog = StepWatchdog(core.config.step_timeout_s)  # times each step; read from any thread
        self._thread = threading.Thread(target=self._loop, name="nlora-engine", daemon=True)
        self._thread.start()

    # -- the callers' side ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called: no request may be added any more."""
        return self._stopping

    def send(self, cmd: Abort | AbortAdapter | AbortAll | SetWeights | WarmUp) -> None:
        """Queue a command for the thread, which runs it between steps after those sent before."""
        self._inbox.put(cmd)
        self._wake.set()

    def add(self, cmd: AddRequest, sink: Sink) -> None:
        """Queue a request; its outputs go to ``sink`` (as RequestOutputs under its client id,
        the last one finished), until it finishes or :meth:`drop` is called."""
        self._sinks[cmd.engine_id] = sink
        self.send(cmd)

    def drop(self, engine_id: str) -> None:
        """The request's consumer went away: send it nothing more, free its blocks and adapter pin."""
        self._sinks.pop(engine_id, None)
        self._ids.close(engine_id)
        self.send(Abort(engine_id, None))

    def abort_all(self, reason: str) -> None:
        """End every request, running or waiting, as aborted with ``reason``. On a hung step (the
        thread reads nothing more) every stream is ended from the calling thread instead."""
        if self.watchdog.stuck():
            # hung: the step thread will never read the inbox; end every stream from here, so that
            # the drain's clients are told rather than cut (the core is the stuck thread's: untouched)
            self._deliver([RequestOutput(eid, "", [], "abort", 0, 0, error=reason) for eid in list(self._sinks)])
            return
        self.send(AbortAll(reason))

    def stop(self) -> None:
        """End the thread, its requests aborted with :data:`SHUTDOWN_REASON`, and wait for it, but
        not behind a hung step (the thread, a daemon, is left in it; logged as an error)."""
        self._stopping = True
        self._wake.set()
        while self._thread.is_alive():
            if self.watchdog.stuck():
                log.error("the engine's step thread is stuck in a step; shutting down without it")
                return
            self._thread.join(timeout=HUNG_POLL_SECONDS)

    def alive(self, wait_s: float = 0.0) -> bool:
        """Whether the thread still runs after waiting up to ``wait_s`` seconds for it to end."""
        self._thread.join(wait_s)
        return self._thread.is_alive()

    # -- the step thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        with on_device(self.core.device):  # the step thread's kernels and events on the engine's GPU
            self._serve()

    def _serve(self) -> None:
        torch.set_num_threads(self._num_threads)  # this thread's own count (engine/threads.py)
        while not self._stopping:
            try:
                self._drain_inbox()
                self._admit_waiting()
                if not self.core.has_work():
                    self._wake.wait(IDLE_RETRY_SECONDS if len(self.waiters) else None)
                    self._wake.clear()
                    continue
                with self.watchdog.timing():
                    outputs = self.core.step()
            except Exception:  # any failure ends every request; the step thread keeps serving
                log.exception("engine step failed; ending every running request")
                with self.watchdog.timing():  # it waits for the device, which may hang too
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
        if not len(self.waiters):
            return
        fair = self.core.scheduler.fair
        placed, failed = self.waiters.admit((lambda t: fair.counters.get(t, 0.0)) if fair is not None else None)
        for cmd in placed:
            self._start(cmd)
        self._deliver([_ended(cmd, "error", str(exc)) for cmd, exc in failed])

    def _end_waiting(self, match: Callable[[AddRequest], bool], reason: str | None,
                     unloaded: bool = False) -> list[RequestOutput]:
        """End the requests waiting for a LoRA slot that ``match`` selects, as aborted (``reason``;
        ``unloaded``: a forced unload's, naming the version)."""
        return [_ended(cmd, "abort", unloaded_reason(cmd.pinned) if unloaded else reason)
                for cmd in self.waiters.remove(match)]

    def _add(self, cmd: AddRequest) -> None:
        if cmd.pinned is not None and cmd.pinned.unloaded:
            # force-unloaded after it was pinned: its abort (AbortAdapter) ran before this request
            # was queued and missed it; it is aborted as the requests running or waiting then were
            (self.core.adapters.release if cmd.placed else self.core.adapters.unreserve)(cmd.pinned, cmd.tenant)
            self._deliver([_ended(cmd, "abort", unloaded_reason(cmd.pinned))])
            return
        if not cmd.placed:
            self.waiters.park(cmd)
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
