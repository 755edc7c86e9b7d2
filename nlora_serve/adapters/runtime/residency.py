"""Which adapter versions sit in which pool slot, within the memory limits (DESIGN §3).

- Tied (IntTune) tenants live in their family's :class:`TiedPool`, all of them, bounded by the
  tied memory budget (``--adapter-memory``, bytes): a tenant over budget is refused at
  registration, before anything is written.
- Untied adapters share one :class:`LoraPool` of ``max_loras`` slots with LRU eviction: an
  evicted adapter's tensors are dropped and re-read from its store folder on its next request
  (a timed, counted cold load). A slot held by a running request, or kept for the requests of
  one response still to be queued (AdapterRegistry.hold), is never evicted. A request that finds
  no slot it may take (:class:`SlotBusy`) waits in the engine until one frees (engine/step_thread.py).
- With tenant shares (fair scheduling), the LoRA slots are shared between the tenants that contend
  for them: a tenant refused a slot contends from then on, for as long as it keeps asking (each
  request within :data:`CONTEND_SECONDS` of the end of its last), and while another tenant contends, a tenant
  holding at least its share, ``max_loras · w / Σw`` over the tenants holding a slot, those
  contending and itself (``w``: the tenants' fair-scheduling weights), takes no other. Without
  this, one tenant granted ``max_loras`` untied adapters kept every slot pinned with as many long
  requests (each ended one replaced at once, its adapter still resident) and every other tenant's
  untied adapter was refused for as long as it liked.

The registry calls :meth:`admit` when a version is registered and :meth:`free` when it is freed;
the engine calls :meth:`ensure_resident` when it admits a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.runtime.family_pool import FamilyPool
from nlora_serve.adapters.runtime.pool import LoraPool, Placement, TiedPool
from nlora_serve.errors import AdapterError, NloraError, RefusalLog, shown
from nlora_serve.models.base import BaseModel

log = logging.getLogger(__name__)

# seconds after its last request ended a tenant refused a LoRA slot still contends for the slots: longer
# than a client's retry backoff, so its next try finds the slot a tenant at its share left, and
# than the gap between its requests, so a slot it gives back between two is not taken at once
CONTEND_SECONDS = 10.0


class PoolFull(AdapterError):
    """No room for an adapter (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""


class SlotBusy(PoolFull):
    """Every LoRA slot is held by requests now, or the tenant holds its share of them: one frees
    when such a request ends, so the native engine parks the request until then (vLLM's queueing
    on ``max_loras``) rather than refusing it."""


def no_slot_message(name: str) -> str:
    """What a tenant refused a LoRA slot reads, in one wording whether every slot is held or its share
    is: either would tell it of other tenants' requests (how many slots they hold, that they wait),
    which it may not learn. The operator's log line (INFO) names the tenants and counts."""
    return f"adapter {shown(name)!r}: no LoRA adapter slot is free for it now (the server is busy); retry shortly"


class AdapterLoadFailed(NloraError):
    """An evicted untied adapter's stored files could not be read back (gone, corrupt, a disk
    error): a fault of the server's, not of the request (gRPC INTERNAL, HTTP 500). The message a
    tenant sees names the adapter and version only; the cause, with the store's paths, goes to the
    server log."""


class Residency:
    """Placement of registered versions into pools.

    Args:
        base: the served base model (dtype, shapes, the tied A/B slices).
        load: re-reads an adapter folder (for an evicted untied adapter's cold load), given the
            content hash the version was registered with (what it must read back as).
        tied_budget: bytes all tied tenants' N may occupy together.
        max_loras: untied adapters resident at once (LoraPool slots).
        max_rank: the widest rank an untied adapter may have (LoraPool width).
        placement: where the pools live (None: the CPU, reading the base model's own weights).
        tenant_shares: tenant -> weight (absent: 1) to share the LoRA slots between contending
            tenants (module docstring); None: first come, first served.
    """

    def __init__(self, base: BaseModel, load: Callable[[Path, str], Adapter], *, tied_budget: int,
                 max_loras: int, max_rank: int, placement: Placement | None = None,
                 tenant_shares: Mapping[str, float] | None = None):
        self.base = base
        self.tenant_shares = tenant_shares
        self._pins: dict[int, Counter] = {}  # id(version) -> tenant -> its requests on that resident untied version
        self._contending: dict[str | None, float] = {}  # tenant -> monotonic time it last asked or ended a request
        self.placement = placement
        self._load = load
        self.tied_budget = tied_budget
        self.tied_pools: dict[str, TiedPool] = {}
        self.lora_pool = LoraPool(base, max_loras, max_rank, placement)
        self._lru: OrderedDict[int, object] = OrderedDict()  # id(version) -> version, resident untied
        self._lock = threading.Lock()
        self._refusals = RefusalLog(log)  # what a tenant refused a slot is not told: the operator's
        self.cold_loads = 0  # untied adapters re-read from the store
        self.cold_load_seconds = 0.0

    @property
    def tied_bytes(self) -> int:
        """Bytes the tied tenants' N occupy now (used slots only)."""
        return sum(p.used * p.slot_bytes for p in self.tied_pools.values())

    def pools(self) -> list:
        """Every pool, tied families first (a snapshot: safe to iterate while admins register)."""
        return [*self.tied_pools.values(), self.lora_pool]

    def admit(self, version) -> None:
        """Place a newly registered version (tied: always; untied: if a slot can be had).

        Raises:
            PoolFull: a tied tenant would exceed the tied memory budget.
        """
        with self._lock:
            if version.is_tied or _family(version) is not None:
                self._admit_tied(version)
            else:
                self._place_untied(version, required=False)

    def set_tenant_shares(self, weights: Mapping[str, float]) -> None:
        """New tenant weights for the LoRA slots' shares (a tenants-file reload); nothing when
        the slots are first come, first served (``tenant_shares`` None)."""
        with self._lock:
            if self.tenant_shares is not None:
                self.tenant_shares = dict(weights)

    def ensure_resident(self, version, tenant: str | None = None) -> bool:
        """Make sure a pinned version has a slot before its request (of ``tenant``) runs (cold
        load if evicted); an untied version's pin is counted for ``tenant`` until :meth:`unpin`.
        Returns whether its LoRA slot is newly held by a request (the version's first pin).

        Raises:
            SlotBusy: every LoRA slot is held by running requests, or (tenant shares) ``tenant``
                holds its share of them while another tenant waits for one (not for a version a
                response holds resident: its requests to come take no further slot) (either way in
                the words of :func:`no_slot_message`; the detail is logged); nothing is pinned. AdapterLoadFailed: its cold load
                failed (the slot it took is free again).
        """
        with self._lock:
            if version.pool is not None and version.pool is not self.lora_pool:
                return False  # tied tenants and family members stay resident
            first = not self._pins.get(id(version))
            # no request pins it: this one would take its slot, unless a response holds it resident for
            # its requests to come (AdapterRegistry.hold), whose first one took the slot already
            if first and not (version.holds and version.slot is not None):
                self._check_share(version, tenant)
            if version.slot is not None:
                self._lru.move_to_end(id(version))
            else:
                self._place_untied(version, required=True, tenant=tenant)
            self._pins.setdefault(id(version), Counter())[tenant] += 1
            if tenant in self._contending:
                self._contending[tenant] = time.monotonic()
            return first

    def unpin(self, version, tenant: str | None = None) -> bool:
        """A request of ``tenant`` on ``version`` ended (once per :meth:`ensure_resident`). Returns
        whether it was ``tenant``'s last on an untied version: the slot may be evicted, or the
        tenant holds one slot fewer (its share), from now on."""
        with self._lock:
            pins = self._pins.get(id(version))
            if pins is None:
                return False  # tied: never counted
            pins[tenant] -= 1
            last = pins[tenant] <= 0
            if last:
                del pins[tenant]
            if not pins:
                del self._pins[id(version)]
            if tenant in self._contending:  # the gap to its next request counts from here
                self._contending[tenant] = time.monotonic()
            return last

    def contention_lapses_at(self) -> float | None:
        """When the first tenant contending for the LoRA slots stops contending unless it asks
        again (``time.monotonic`` seconds; None: none contends): from then on a request refused
        its share may have a slot with none freed."""
        with self._lock:
            now = time.monotonic()
            first = min((at for at in self._contending.values() if now - at < CONTEND_SECONDS), default=None)
        return None if first is None else first + CONTEND_SECONDS

    def _check_share(self, version, tenant: str | None) -> None:
        """Refuse ``tenant`` a further LoRA slot while another tenant contends for the slots and it
        holds its share (``max_loras`` over the tenants holding a slot, those contending and itself)."""
        if self.tenant_shares is None:
            return
        now = time.monotonic()
        self._contending = {t: at for t, at in self._contending.items() if now - at < CONTEND_SECONDS}
        others = set(self._contending) - {tenant}
        if not others:
            return
        holders = {t for key in self._lru for t in self._pins.get(key, ())}
        held = sum(1 for key in self._lru if tenant in self._pins.get(key, ()))
        weight = self.tenant_shares.get
        share = self.lora_pool.capacity * weight(tenant, 1.0) / sum(weight(t, 1.0) for t in holders | others | {tenant})
        if held >= max(1.0, share):
            self._contending[tenant] = now
            self._refusals.info(("lora_share", tenant), "LoRA slot not given to tenant %r for adapter %s v%d "
                                "(its request waits): its requests hold %d of the %d slots (--max-loras), its share "
                                "%.3g while tenants %s wait for one", tenant, version.name, version.version, held,
                                self.lora_pool.capacity, share, sorted(others, key=str))
            raise SlotBusy(no_slot_message(version.name))

    def free(self, version) -> None:
        """Give back a freed version's slot; a tied or family pool left with no tenant is dropped
        (``retired``), so its memory (N for every slot, a family's own copy of its factors: up to
        78 MB at rank 64) goes with its last adapter instead of staying for the server's life."""
        with self._lock:
            if version.slot is None:
                return
            pool = version.pool
            pool.release_slot(version.slot)
            self._lru.pop(id(version), None)
            self._pins.pop(id(version), None)
            version.pool, version.slot = None, None
            if pool is not self.lora_pool and pool.used == 0 and self.tied_pools.get(pool.family) is pool:
                del self.tied_pools[pool.family]
                pool.retired = True

    def _admit_tied(self, version) -> None:
        """A tied tenant into its family's TiedPool, a compressed family member into its
        FamilyPool (keyed by the factors' hash); both count against the tied budget."""
        adapter = version.adapter
        key = _family(version) or adapter.family_key
        pool = self.tied_pools.get(key)
        if pool is None:
            kind = FamilyPool if _family(version) else TiedPool
            pool = kind(self.base, key, adapter, placement=self.placement)
        if self.tied_bytes + pool.slot_bytes > self.tied_budget:
            raise PoolFull(f"adapter {version.name!r}: tied tenants would need {self.tied_bytes + pool.slot_bytes} "
                           f"bytes, over the budget of {self.tied_budget} bytes (--adapter-memory)")
        self.tied_pools.setdefault(key, pool)
        slot = pool.take_slot()
        if slot is None:
            pool.grow()
            slot = pool.take_slot()
        try:
            pool.write(slot, adapter)
        except BaseException:
            pool.release_slot(slot)  # refused (s · N overflows): the slot is free again
            raise
        version.pool, version.slot = pool, slot

    def _place_untied(self, version, required: bool, tenant: str | None = None) -> None:
        pool = self.lora_pool
        slot = pool.take_slot()
        if slot is None:
            slot = self._evict_lru()
        if slot is None:
            if required and self.tenant_shares is not None:
                self._contending[tenant] = time.monotonic()
            if required:
                self._refusals.info(("lora_full", tenant), "LoRA slot not free for tenant %r for adapter %s v%d (its "
                                    "request waits): all %d slots (--max-loras) are held by running requests", tenant, version.name,
                                    version.version, pool.capacity)
                raise SlotBusy(no_slot_message(version.name))
            return
        try:
            if version.adapter is None:
                start = time.perf_counter()
                version.adapter = self._cold_load(version)
                self.cold_loads += 1
                self.cold_load_seconds += time.perf_counter() - start
            pool.write(slot, version.adapter)
        except BaseException:  # a failed re-read (files gone, a disk error) keeps no slot, or each would cost one
            pool.release_slot(slot)
            raise
        version.pool, version.slot = pool, slot
        self._lru[id(version)] = version

    def _cold_load(self, version) -> Adapter:
        """Re-read an evicted version from its store folder.

        Raises:
            AdapterLoadFailed: the folder cannot be read back as the adapter it was (the cause is
                logged, with its paths; the tenant's message holds none).
        """
        try:
            adapter = self._load(version.path, version.content_hash)
            if adapter.content_hash != version.content_hash:  # bit rot, or a hand edit: not what requests report
                raise AdapterError(f"its files changed on disk since it was registered: they hash to "
                                   f"{adapter.content_hash[:16]}…, the version is {version.content_hash[:16]}…")
            return adapter
        except (AdapterError, OSError) as exc:
            log.error("cold load of adapter %s v%d from %s failed: %s", version.name, version.version,
                      version.path, exc)
            raise AdapterLoadFailed(f"adapter {version.name!r} v{version.version} could not be loaded back from "
                                    "this server's adapter store (the server's log says why): an operator must "
                                    "upload or swap it again") from None

    def _evict_lru(self) -> int | None:
        # residency's pins, not the registry's refcount: that counts requests waiting for a slot
        # too, and one refused its share must not keep the slot it may not use
        for key, victim in self._lru.items():
            if not self._pins.get(key) and victim.holds == 0:
                del self._lru[key]
                slot = victim.slot
                victim.pool, victim.slot = None, None
                victim.adapter = None  # drop its tensors: re-read from the store on demand
                log.info("evicted adapter %s v%d from LoRA slot %d", victim.name, victim.version, slot)
                return slot
        return None


def _family(version) -> str | None:
    """The compressed family a version belongs to (None: not a family member)."""
    return getattr(version.adapter, "shared_family", None)
