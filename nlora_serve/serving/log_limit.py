"""How many refusal lines the request log (``serve --enable-log-requests``, request_log.py) writes:
a token bucket per reason, so that a client sending 10,000 bad requests a second writes a few lines,
not 10,000, and a flood of one reason does not hide the others.

The numbers are the Linux kernel's ``printk_ratelimit`` defaults (``DEFAULT_RATELIMIT_BURST`` 10
lines per ``DEFAULT_RATELIMIT_INTERVAL`` 5 s): each reason may write :data:`BURST` lines at once and
then :data:`LINES_PER_SECOND` (2) a second on average. A refusal line left out is counted; the
next line of the log (a refusal of any reason, or a request's end), once that reason has a line to
spend again, is preceded by one summary line per reason with lines left out::

    suppressed 990 refusal lines (reason=queue_full) in the last 4.5 s

(the time from the first line left out to the summary), which spends none. In a sustained flood of
one reason that is at most 2 refusal lines and 2 summaries a second; the reasons are a fixed
vocabulary (metrics.REJECT_REASONS), so the state is bounded. Successful requests' lines are never
limited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

BURST = 10  # lines a reason may write at once (the kernel's DEFAULT_RATELIMIT_BURST)
LINES_PER_SECOND = BURST / 5.0  # then on average (DEFAULT_RATELIMIT_BURST per DEFAULT_RATELIMIT_INTERVAL 5 s)


class _Bucket:
    __slots__ = ("tokens", "at", "suppressed", "since")

    def __init__(self, now: float):
        self.tokens, self.at = float(BURST), now  # full at the first line
        self.suppressed, self.since = 0, now  # lines left out, the time of the first of them

    def refill(self, now: float, rate: float, burst: int) -> None:
        self.tokens = min(float(burst), self.tokens + (now - self.at) * rate)
        self.at = now


class RefusalLineLimit:
    """Decides which refusal lines are written. Thread-safe.

    Args:
        clock: seconds, monotonic (``time.monotonic``; a fake one in tests).
        burst: lines a reason may write at once.
        rate: lines per second a reason may write on average.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, burst: int = BURST,
                 rate: float = LINES_PER_SECOND):
        if burst < 1 or not rate > 0:
            raise ValueError(f"burst must be >= 1 and rate > 0; got burst={burst!r}, rate={rate!r}")
        self._clock, self._burst, self._rate = clock, burst, rate
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, reason: str) -> tuple[bool, list[str]]:
        """Whether a refusal line of ``reason`` is written now, and the summary lines to write before
        it (every reason's lines left out whose reason may write again: see the module docstring)."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(reason)
            if bucket is None:
                bucket = self._buckets[reason] = _Bucket(now)
            summaries = self._due(now)
            bucket.refill(now, self._rate, self._burst)
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return True, summaries
            if not bucket.suppressed:
                bucket.since = now
            bucket.suppressed += 1
            return False, summaries

    def due(self) -> list[str]:
        """The summary lines due now (every reason's lines left out whose reason may write again),
        for a line of another kind to write first: a flood that stopped is summed up at the next
        line of the log, not only at the next refusal."""
        now = self._clock()
        with self._lock:
            return self._due(now)

    def _due(self, now: float) -> list[str]:
        summaries = []
        for name, other in self._buckets.items():
            if other.suppressed:
                other.refill(now, self._rate, self._burst)
                if other.tokens >= 1.0:
                    summaries.append(f"suppressed {other.suppressed} refusal lines (reason={name}) "
                                     f"in the last {now - other.since:.1f} s")
                    other.suppressed = 0
        return summaries
