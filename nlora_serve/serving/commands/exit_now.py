"""Exit at once, past a thread that will never return: a dead engine's step thread, stuck in a hung step.

A hung step (engine/step_watchdog.py) leaves the native engine's step thread in that step for
good. ``serve`` aborts its requests, without a drain, and shuts down without it
(LLMEngine.shutdown), ``generate`` reports the dead engine (commands/generate.py), but the
interpreter's own exit may still wait behind it: its exit hooks join every thread-pool worker (concurrent.futures),
and one waiting on the hung step (an admin call, a grammar compile) waits as long; on CUDA, the
runtime's teardown may wait for the hung kernel. The supervisor's restart waited with it, for
ever where nothing kills the process. :func:`exit_now` ends the process with ``os._exit`` once the
log and stdio are flushed: no exit hook, finalizer or thread join runs. Before that, serve's event
loop must close: ``asyncio.run`` (3.11) joins its default executor's threads with no time limit,
and an admin call there (``asyncio.to_thread``) may wait on the hung step or a store's fsync;
:class:`LoopThreads` bounds that join where the engine is dead. What that skips is safe to
skip here: the adapter store's flock goes with the process (the kernel drops it), and the removed
versions it had yet to delete in its staging area go at the next start. Torch-free.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

# how long a dead engine's exit waits for its step thread to end before leaving it behind
STUCK_STEP_JOIN_SECONDS = 1.0


def exit_now(code: int, why: str, log: logging.Logger = logging.getLogger("nlora_serve.serve")) -> NoReturn:
    """Log ``why`` (ERROR, on ``log``), flush and close every log handler and stdio, then end the
    process with status ``code`` without the interpreter's teardown (``os._exit``). Never returns."""
    log.error("exiting now with status %d, without waiting for the interpreter's teardown: %s", code, why)
    logging.shutdown()  # flushes and closes every handler
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone away, a closed stream: nothing more to save
            pass
    os._exit(code)


class LoopThreads(ThreadPoolExecutor):
    """An event loop's default executor (``asyncio.to_thread``, ``run_in_executor(None, ...)``) whose
    ``shutdown(wait=True)``, which the loop's close runs (``asyncio.run``, ``Runner.close``), waits at
    most :attr:`join_s` seconds for its threads where that is set (None: for as long as they run, as
    a plain executor); :meth:`busy` then names those still in a call. With a limit set, calls queued
    and not started are cancelled. Python 3.12's ``asyncio.run`` bounds the same join at 300 s."""

    join_s: float | None = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        bounded = self.join_s is not None
        super().shutdown(wait=wait and not bounded, cancel_futures=cancel_futures or bounded)
        if wait and bounded:
            deadline = time.monotonic() + self.join_s
            for thread in list(self._threads):
                thread.join(max(0.0, deadline - time.monotonic()))

    def busy(self) -> list[str]:
        """The names of this executor's threads still alive after :meth:`shutdown` (each in a call
        that has not returned); those the interpreter's exit would join."""
        return sorted(thread.name for thread in self._threads if thread.is_alive())
