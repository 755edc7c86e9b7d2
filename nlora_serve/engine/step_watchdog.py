"""The engine-step watchdog: a step that runs past a limit makes the engine dead.

A step that hangs (a deadlocked kernel or collective on a GPU, a stuck native op, a loop that never
ends) raises nothing: without this the process stays up, ``/health`` says 200 and every request
waits for ever. The step thread stamps when its step began (:meth:`StepWatchdog.timing`); any other
thread, the server's engine watcher or ``/health``, reads the stamp (:meth:`StepWatchdog.reason`),
so a hang is found without the stuck thread's help. The engine is then dead
(:attr:`~nlora_serve.engine.api.Engine.dead_reason`): health 503, its requests aborted (no drain),
exit 1, and the supervisor starts a fresh process. vLLM's counterparts:
``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` (300 s, one ``execute_model`` call of the V1 multiprocess
executor) and the older ``VLLM_ENGINE_ITERATION_TIMEOUT_S`` (60 s, one engine iteration).

The limit: ``EngineConfig.step_timeout_s`` (``--engine-step-timeout``; defaults by device in
:data:`~nlora_serve.engine.config.DEFAULT_STEP_TIMEOUT_S`). Only steps are timed: start-up
(weights, graph capture, the warm-up's compiles) runs in the engine's constructor before the step
thread starts, and :meth:`LLMEngine.warm_up` between steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

class StepWatchdog:
    """When the running step began, and whether one has run past ``limit_s`` seconds.

    ``limit_s``: seconds; 0 turns the watchdog off. ``clock``: monotonic seconds (tests pass a fake).
    The stamp is one attribute, written by the step thread and read by any: no lock is needed.
    """

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self._clock = clock
        self._started: float | None = None  # clock() when the running step began; None between steps
        self._reason: str | None = None  # set once a step has run past the limit; never cleared

    @property
    def in_step(self) -> bool:
        """Whether a step is running now."""
        return self._started is not None

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Time one step (the step thread's). A step that ends past the limit trips the watchdog too,
        so that whether a slow step counts does not depend on a reader having looked in time."""
        started = self._started = self._clock()
        try:
            yield
        finally:
            self._started = None
            self._check(started)

    def stuck(self) -> bool:
        """Whether the step running now has run past the limit: its thread reads nothing more (a
        hung step). False between steps, and during a step within the limit after an earlier one
        tripped the watchdog (a slow step that ended: its thread serves on). From any thread."""
        started = self._started
        if started is None or self.reason() is None:
            return False
        return self._started == started and self._clock() - started > self.limit_s

    def reason(self) -> str | None:
        """None while every step has kept within the limit, else why the engine is dead, e.g. "an
        engine step has run for 312.0 s (limit 300 s, --engine-step-timeout)"; from any thread."""
        if self._reason is None:
            self._check(self._started, running=True)
        return self._reason

    def _check(self, started: float | None, running: bool = False) -> None:
        if started is None or not self.limit_s or self._reason is not None:
            return
        elapsed = self._clock() - started
        # running: the step read is still the one running (it may have ended, in time, since)
        if elapsed > self.limit_s and (not running or self._started == started):
            self._reason = (f"an engine step has run for {elapsed:.1f} s (limit {self.limit_s:g} s, "
                            "--engine-step-timeout)")
            log.error("%s: the engine is treated as hung", self._reason)
