"""Requests waiting for a LoRA slot (the native engine's step thread; DESIGN §3).

An untied adapter's request that finds every ``--max-loras`` slot held by requests, or its
tenant's share of them (:class:`~nlora_serve.adapters.residency.SlotBusy`), waits here with its
version reserved (``AdapterManager.reserve``: not freed, no slot) instead of being refused, as
vLLM's scheduler leaves a waiting request whose LoRA would exceed ``max_loras`` in the queue.
Between steps the engine tries each again (:meth:`SlotWaiters.admit`), in the scheduling policy's
order: arrival with "fcfs"; with "fair", the tenant with the least service first (the scheduler's
VTC counters), so a tenant with many requests waiting does not keep the others out, while the
residency's share rule still decides whether a tenant may take one more slot. A request that is
placed joins the scheduler's queue; the others keep waiting, none behind another (a request on an
adapter already resident, or tied, goes as soon as it is tried).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from nlora_serve.adapters.manager import AdapterManager
from nlora_serve.adapters.residency import SlotBusy

# seconds between tries while requests wait for a slot and no step runs: a slot may free with no
# step (a response's hold let go, a tenant's contention lapsing), and nothing wakes the engine then
IDLE_RETRY_SECONDS = 0.05


class Waiter(Protocol):
    engine_id: str
    pinned: object  # its reserved AdapterVersion
    tenant: str | None


class SlotWaiters:
    """The requests waiting for a LoRA slot, oldest first; used by one thread (the step thread),
    but ``len`` may be read from any."""

    def __init__(self, adapters: AdapterManager | None) -> None:
        self._adapters = adapters
        self._waiting: list[Waiter] = []  # by arrival

    def __len__(self) -> int:
        return len(self._waiting)

    def park(self, waiter: Waiter) -> None:
        """Queue a request whose version is reserved but not placed."""
        self._waiting.append(waiter)

    def admit(self, service: Callable[[str | None], float] | None) -> tuple[list[Waiter], list[tuple[Waiter, Exception]]]:
        """Try to place each waiting request, by ``service`` of its tenant (None: by arrival) and
        then arrival; returns the placed ones (to be queued, in that order) and those that failed
        for good with why (unreserved: an evicted adapter's files could not be read back)."""
        order = list(self._waiting)
        if service is not None:
            order.sort(key=lambda w: service(w.tenant))  # stable: arrival within equal service
        busy: set[tuple[int, str | None]] = set()  # refused this round: the same answer again
        placed, failed = [], []
        for waiter in order:
            key = (id(waiter.pinned), waiter.tenant)
            if key in busy:
                continue
            try:
                self._adapters.place(waiter.pinned, waiter.tenant)
            except SlotBusy:
                busy.add(key)
                continue
            except Exception as exc:  # AdapterLoadFailed: only this request fails
                self._adapters.unreserve(waiter.pinned, waiter.tenant)
                failed.append((waiter, exc))
            else:
                placed.append(waiter)
        self._drop([*placed, *(w for w, _ in failed)])
        return placed, failed

    def remove(self, match: Callable[[Waiter], bool]) -> list[Waiter]:
        """Take the waiting requests ``match`` selects out of the queue, their reservations dropped
        (an abort, a forced unload, shutdown)."""
        gone = [w for w in self._waiting if match(w)]
        self._drop(gone)
        for waiter in gone:
            self._adapters.unreserve(waiter.pinned, waiter.tenant)
        return gone

    def _drop(self, waiters: list[Waiter]) -> None:
        ids = {id(w) for w in waiters}
        self._waiting = [w for w in self._waiting if id(w) not in ids]
