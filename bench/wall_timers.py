"""Wall-clock timers wrapped around an engine's own calls, for the breakdown benches
(cpu_breakdown.py, decode_parts.py, adapter_ops.py). A wrapper costs ~1 µs a call."""

from __future__ import annotations

import functools
import time


def timed(fn, record):
    """``fn``, calling ``record(seconds, *args)`` after each call (also when it raises)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record(time.perf_counter() - start, *args)
    return wrapper
