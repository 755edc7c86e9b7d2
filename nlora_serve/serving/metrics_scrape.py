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
never notices. :class:`SharedScrapeThreads` applies the same rule to ``--metrics-port``'s
scrapes, each served on a thread of its own (metrics_http.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# a rendering that took REUSE_ABOVE_S of CPU time or more answers the scrapes of the next REUSE_FACTOR
# times as long (wall time): in a thread of this process its pure-Python work still takes the GIL from
# the engine's step thread every 5 ms (each torch call there waits to take it back), so only rendering
# less often bounds what keyless scrapes cost the tenants (~9% of the time at most). A small registry
# (a server without --tenant-metrics, the tests') renders in a millisecond or two of CPU: each scrape
# is fresh, as before, however long a busy box makes it wait for the GIL (CPU time, not wall time,
# decides: a wall-time test made a 60 ms wait on a loaded CI box serve stale counts for 0.6 s)
REUSE_ABOVE_S = 0.05
REUSE_FACTOR = 10.0
# one rendering at a time in the process (its servers' scrapes queue here, never on the default
# executor that whole responses and admin calls use)
_SCRAPE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-scrape")


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
        return _timed(self._render)

    def _done(self, finished: asyncio.Future) -> None:
        if self._running is finished:
            self._running = None
        if not finished.cancelled() and finished.exception() is None:  # retrieved: its scrapers may all be gone
            self._last = (finished.result()[1], finished)


class SharedScrapeThreads:
    """``--metrics-port``'s renderings of ``render`` (returns (body, content type)), for callers on
    threads of their own (a scrape per connection): a call while one renders waits for that one and
    gets its result, and a call within :data:`REUSE_FACTOR` times as long after a rendering that took
    :data:`REUSE_ABOVE_S` of CPU time or more gets that one's (:class:`SharedScrape`'s rule). Without
    it, N scrapers at once were N renderings side by side, each 0.4 s of the GIL at 1,000 tenants."""

    def __init__(self, render: Callable[[], tuple[bytes, str]]) -> None:
        self._render = render
        self._cond = threading.Condition()
        self._rendering = False
        self._ended = 0  # renderings ended so far
        # the last one's (reused until, its result or None, the error it raised or None)
        self._last: tuple[float, tuple[bytes, str] | None, BaseException | None] = (0.0, None, None)
        self.sharers = 0  # calls waiting for the rendering running now (for tests)

    def __call__(self) -> tuple[bytes, str]:
        """(body, content type) of the rendering running now or just ended, else of a new one.

        Raises:
            Whatever ``render`` raised, to every scrape that shared it.
        """
        with self._cond:
            if self._rendering:
                ended = self._ended
                self.sharers += 1
                try:
                    while self._ended == ended:
                        self._cond.wait()
                finally:
                    self.sharers -= 1
                return self._result()
            if time.monotonic() < self._last[0]:
                return self._result()
            self._rendering = True
        out = error = None
        until = 0.0
        try:
            out, until = _timed(self._render)
        except BaseException as exc:
            error = exc
        with self._cond:
            self._last = (until, out, error)
            self._rendering = False
            self._ended += 1
            self._cond.notify_all()
            return self._result()

    def _result(self) -> tuple[bytes, str]:
        _, out, error = self._last
        if error is not None:
            raise error
        return out


def _timed(render: Callable[[], tuple[bytes, str]]) -> tuple[tuple[bytes, str], float]:
    """``render()``'s result and until when (time.monotonic()) it may answer later scrapes: its end,
    plus :data:`REUSE_FACTOR` times its wall time where it took :data:`REUSE_ABOVE_S` of CPU time."""
    start, cpu = time.monotonic(), time.thread_time()
    out = render()
    end, cpu = time.monotonic(), time.thread_time() - cpu
    return out, end + (REUSE_FACTOR * (end - start) if cpu >= REUSE_ABOVE_S else 0.0)
