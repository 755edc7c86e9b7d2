"""``GET /metrics`` on the API port, off the event loop and shared between the scrapes that overlap.

A scrape renders every series (prometheus_client's ``generate_latest``, pure Python): with
``--tenant-metrics`` that is ~45 series per tenant seen, 4.2 MB of text and 0.4 s of CPU at 1,000
tenants (a loaded 2-core box). The route rendered it on the event loop, which also runs every gRPC and HTTP
stream of every tenant, and ``/metrics`` takes no key: a client with none, scraping in a loop, froze
every tenant's streams for as long as it kept going, and a plain 15 s Prometheus scrape put a pause of
that length into every stream's inter-token latency. :class:`SharedScrape` renders on a thread of its
own (the loop keeps running, sharing the GIL) and hands one rendering to every scrape that arrives
while it runs, so N clients scraping at once cost one rendering, not N; a slow rendering also answers
the scrapes of a while after it (:data:`REUSE_FACTOR`), which Prometheus, scraping every 15 s or so,
never notices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

# a rendering that took REUSE_ABOVE_S of CPU time or more answers the scrapes of the next REUSE_FACTOR
# times as long (wall time): in a thread of this process its pure-Python work still takes the GIL from
# the engine's step thread every 5 ms (each torch call there waits to take it back), so only rendering
# less often bounds what keyless scrapes cost the tenants (~9% of the time at most). A small registry
# (a server without --tenant-metrics, the tests') renders in a millisecond or two of CPU: each scrape
# is fresh, as before, however long a busy box makes it wait for the GIL (CPU time, not wall time,
# decides: a wall-time test made a 60 ms wait on a loaded CI box serve stale counts for 0.6 s)
REUSE_ABOVE_S = 0.05
REUSE_FACTOR = 10.0
T = TypeVar("T")
# one rendering at a time in the process (its servers' scrapes queue here, never on the default
# executor that whole responses and admin calls use)
_SCRAPE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-scrape")


def timed_rendering(render: Callable[[], T]) -> tuple[T, float, float]:
    """``render()``, when it ended and until when its answer may be reused (``time.monotonic()``
    seconds): :data:`REUSE_FACTOR` times its wall time after it ended where it took
    :data:`REUSE_ABOVE_S` of the calling thread's CPU time or more, else not at all (the ended time).
    Both ports' sharing (this module's :class:`SharedScrape`, metrics_http.py's) use this rule."""
    start, cpu = time.monotonic(), time.thread_time()
    out = render()
    end, cpu = time.monotonic(), time.thread_time() - cpu
    return out, end, end + (REUSE_FACTOR * (end - start) if cpu >= REUSE_ABOVE_S else 0.0)


class SharedScrape:
    """Awaitable renderings of ``render`` (returns (body, content type)): a call while one runs gets
    that one's result, and so does a call within :data:`REUSE_FACTOR` times as long after it ended
    as it took, where it took :data:`REUSE_ABOVE_S` of CPU time or more (however many clients scrape in a loop,
    a slow rendering runs ~9% of the time at most). Event-loop only (one loop at a time); ``render``
    must be thread-safe."""

    def __init__(self, render: Callable[[], tuple[bytes, str]]) -> None:
        self._render = render
        self._running: asyncio.Future | None = None
        self._last: tuple[float, asyncio.Future] | None = None  # (reused until, the rendering that ended)

    async def __call__(self) -> tuple[bytes, str]:
        """(body, content type) of the rendering running now or just ended, else of a new one.

        Raises:
            Whatever ``render`` raised, to every scrape that shared it.
        """
        loop = asyncio.get_running_loop()
        last, running = self._last, self._running
        if last is not None and last[1].get_loop() is loop and time.monotonic() < last[0]:
            running = last[1]
        elif running is None or running.get_loop() is not loop:
            running = self._running = loop.run_in_executor(_SCRAPE_THREAD, self._timed)
            running.add_done_callback(self._done)
        # shielded: a scraper that goes away cancels its own wait, not the rendering the others await
        return (await asyncio.shield(running))[0]

    def _timed(self) -> tuple[tuple[bytes, str], float]:
        out, _, reused_until = timed_rendering(self._render)
        return out, reused_until

    def _done(self, finished: asyncio.Future) -> None:
        if self._running is finished:
            self._running = None
        if not finished.cancelled() and finished.exception() is None:  # retrieved: its scrapers may all be gone
            self._last = (finished.result()[1], finished)
