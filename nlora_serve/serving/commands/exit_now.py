"""Exit at once, past a thread that will never return: a dead engine's step thread, stuck in a hung step.

A hung step (engine/step_watchdog.py) leaves the native engine's step thread in that step for
good. ``serve`` drains and shuts down without it (LLMEngine.shutdown), ``generate`` reports the
dead engine (commands/generate.py), but the interpreter's own
exit may still wait behind it: its exit hooks join every thread-pool worker (concurrent.futures),
and one waiting on the hung step (an admin call, a grammar compile) waits as long; on CUDA, the
runtime's teardown may wait for the hung kernel. The supervisor's restart waited with it, for
ever where nothing kills the process. :func:`exit_now` ends the process with ``os._exit`` once the
log and stdio are flushed: no exit hook, finalizer or thread join runs. What that skips is safe to
skip here: the adapter store's flock goes with the process (the kernel drops it), and the removed
versions it had yet to delete in its staging area go at the next start. Torch-free.
"""

from __future__ import annotations

import logging
import os
import sys
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
