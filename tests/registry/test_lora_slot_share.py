"""The LoRA slot share rule: a tenant refused one of the --max-loras slots contends for them while
it keeps asking (until 10 s after its last request ended), a tenant at its share yields to it, a
held version's queued requests take no further slot; and refusals' log lines, one per tenant and
kind every 10 s. Pools, eviction, pinning and the tied budget are test_residency.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from residency_helpers import SharedSlots, refused

pytestmark = pytest.mark.usefixtures("every_refusal_logged")


def test_a_tenants_refusals_of_one_kind_are_logged_once_per_ten_seconds(monkeypatch, caplog):
    """A client retrying in a loop (or an overload) wrote a line per refusal; now one per tenant and
    kind every 10 s, which counts those it stood for."""
    from nlora_serve import errors

    monkeypatch.setattr(errors, "REFUSAL_LOG_SECONDS", 10.0)
    clock = [0.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: clock[0])
    refusals = errors.RefusalLog(logging.getLogger("refusal-log-test"))
    caplog.set_level(logging.INFO, logger="refusal-log-test")
    for at, kind, tenant in [(0.0, "full", "ann"), (1.0, "full", "ann"), (2.0, "full", "ben"), (9.9, "full", "ann"),
                             (10.0, "full", "ann"), (10.5, "share", "ann"), (20.0, "full", "ann")]:
        clock[0] = at
        refusals.info((kind, tenant), "%s refused (%s)", tenant, kind)
    assert caplog.messages == ["ann refused (full)", "ben refused (full)",
                               "ann refused (full) (2 more like it since the last line)", "ann refused (share)",
                               "ann refused (full)"]


def test_a_tenant_holding_every_lora_slot_yields_one_to_a_tenant_refused_one(base_fp32, tmp_path, caplog):
    """A hostile tenant granted max_loras untied adapters kept every slot pinned with one long
    request per adapter, each replaced the moment it ended (its adapter still resident, so it never
    even looked for a slot): every other tenant's untied adapter was PoolFull for as long as it
    liked (a live server: carol refused 429 on every try). Now a tenant refused a slot contends for
    the slots while it keeps asking (its requests wait in the engine, which asks again between
    steps), and a tenant holding its share (2 slots / 2 tenants) takes no other meanwhile."""
    slots = SharedSlots(base_fp32, tmp_path, ("bob-a", "bob-b", "carol-a", "carol-b"))
    vs, pin, unpin = slots.versions, slots.pin, slots.unpin

    pin("bob-a", "bob")
    pin("bob-b", "bob")  # alone, bob may hold every slot
    refused(caplog, lambda: pin("carol-a", "carol"), "carol-a",
            r"not free for tenant 'carol' for adapter carol-a v1 \(its request waits\): all 2 slots \(--max-loras\) are held by running")
    unpin("bob-a", "bob")  # bob's request on bob-a ends and bob sends the next at once
    refused(caplog, lambda: pin("bob-a", "bob"), "bob-a",
            r"not given to tenant 'bob' for adapter bob-a v1 \(its request waits\): its requests hold 1 of the 2 slots \(--max-loras\), "
            r"its share 1 while tenants \['carol'\] wait for one")
    pin("carol-a", "carol")  # carol's retry takes bob-a's slot
    assert vs["carol-a"].slot is not None and vs["bob-a"].slot is None
    pin("carol-a", "carol")  # a second request on a version carol holds takes no further slot
    unpin("carol-a", "carol")
    # one slot each while carol contends: bob contends for a second one
    refused(caplog, lambda: pin("bob-a", "bob"), "bob-a", r"tenant 'bob' for adapter bob-a v1 \(its request waits\): its requests hold 1 of")
    unpin("bob-b", "bob")
    pin("carol-a", "carol")
    # carol, at her share, yields the slot bob-b left to bob, who waits
    refused(caplog, lambda: pin("carol-b", "carol"), "carol-b",
            r"tenant 'carol' for adapter carol-b v1 \(its request waits\): its requests hold 1 of the 2 slots .* tenants \['bob'\] wait")
    pin("bob-a", "bob")
    assert vs["bob-a"].slot is not None and vs["bob-b"].slot is None and vs["carol-a"].slot is not None



def test_a_tenant_contends_for_lora_slots_until_ten_seconds_after_its_last_request_ended(base_fp32, tmp_path,
                                                                                          monkeypatch, caplog):
    """Counted from a request's start, carol's contention lapsed while her request ran (12 s on a
    loaded 2-core server) and bob took her slot back the moment it ended: 7 of her 84 one-second
    retries got through in 2 minutes, 40 of 57 counted from its end."""
    from nlora_serve.adapters.runtime import residency as residency_module

    clock = [100.0]
    monkeypatch.setattr(residency_module.time, "monotonic", lambda: clock[0])
    slots = SharedSlots(base_fp32, tmp_path, ("bob-a", "bob-b", "carol-a"))
    vs = slots.versions

    def pin(name, tenant, at):
        clock[0] = at
        slots.pin(name, tenant)

    def unpin(name, tenant, at):
        clock[0] = at
        slots.unpin(name, tenant)

    pin("bob-a", "bob", 100.0)
    pin("bob-b", "bob", 100.0)
    refused(caplog, lambda: pin("carol-a", "carol", 100.0), "carol-a", "tenant 'carol' .*: all 2 slots")
    unpin("bob-b", "bob", 101.0)
    pin("carol-a", "carol", 101.0)
    unpin("carol-a", "carol", 113.0)  # her request ran 12 s
    # 7 s after it ended (19 s after it began): carol still contends
    refused(caplog, lambda: pin("bob-b", "bob", 120.0), "bob-b", r"tenant 'bob' .*: its requests hold 1 of the 2 slots")
    pin("bob-b", "bob", 123.5)  # 10.5 s after: she stopped asking, bob may have both again
    assert vs["bob-b"].slot is not None and vs["carol-a"].slot is None


def test_a_held_versions_requests_to_come_take_no_further_slot(base_fp32, tmp_path, caplog):
    """A response's other choices, queued on the version it holds after its choice 0 ended (one
    token), pin a slot the hold already keeps: they take no further slot and are not refused by
    the share rule (they were PoolFull: the admitted response a 409 'choice 1 of 3 could not be
    queued', while its slot stayed kept until the hold ended). A version without the hold is
    still refused, as before."""
    slots = SharedSlots(base_fp32, tmp_path, ("bob-a", "bob-b", "carol-a"))
    res, vs, pin, unpin = slots.residency, slots.versions, slots.pin, slots.unpin

    pin("bob-a", "bob")  # a long request of bob's
    vs["bob-b"].holds = 1  # bob's n=3 response on bob-b holds it ...
    pin("bob-b", "bob")  # ... its choice 0 runs
    refused(caplog, lambda: pin("carol-a", "carol"), "carol-a", "tenant 'carol' .*: all 2 slots")
    unpin("bob-b", "bob")  # choice 0 ended at its one token: carol contends, bob holds his share
    for _ in range(2):  # choices 1 and 2
        pin("bob-b", "bob")
    assert res.lora_pool.used == 2 and vs["bob-b"].slot is not None and vs["carol-a"].slot is None
    for _ in range(2):
        unpin("bob-b", "bob")
    vs["bob-b"].holds = 0  # the response ended: the share rule applies to bob-b again
    refused(caplog, lambda: pin("bob-b", "bob"), "bob-b",
            r"tenant 'bob' for adapter bob-b v1 \(its request waits\): its requests hold 1 of the 2 slots")


def test_requests_waiting_keep_their_tenant_contending_and_take_a_slot_when_another_stops(base_fp32, tmp_path,
                                                                                         monkeypatch, caplog):
    """The engine's waiting requests (engine/slot_wait.py) are tried again after a change only (a
    request's end here), yet a waiting tenant contends for as long as it waits, and one refused its
    share is placed once the other tenant's contention lapses, 10 s after its last request ended,
    with no change. Every slot held by bob, his request on bob-c and carol's on carol-a wait from
    t=100 on, tried every second (a step): at t=130 a slot frees and goes to carol, who has waited
    30 s (bob, first in arrival order, holds his share); her request ends at once, and bob's takes
    the slot 10 s later, not before."""
    from nlora_serve.adapters.runtime import residency as residency_module
    from nlora_serve.adapters.runtime.manager import AdapterManager
    from nlora_serve.engine.slot_wait import SlotWaiters

    clock = [100.0]
    monkeypatch.setattr(residency_module.time, "monotonic", lambda: clock[0])  # slot_wait's clock too
    slots = SharedSlots(base_fp32, tmp_path, ("bob-a", "bob-b", "bob-c", "carol-a"))
    vs = slots.versions
    manager = AdapterManager(base_fp32, tmp_path / "store", residency=slots.residency)
    waiting = SlotWaiters(manager)

    def start(name: str, tenant: str) -> None:  # a request placed at once (reserve's refcount, then place)
        vs[name].refcount += 1
        manager.place(vs[name], tenant)

    def steps(until: float) -> list[str]:
        """admit between steps, one a second, up to ``until``; the adapters of the placed requests."""
        placed = []
        while clock[0] < until:
            clock[0] += 1.0
            placed += [f"{w.pinned.name}@{clock[0]:g}" for w in waiting.admit(None)[0]]
        return placed

    start("bob-a", "bob")
    start("bob-b", "bob")
    for name, tenant in (("bob-c", "bob"), ("carol-a", "carol")):
        vs[name].refcount += 1  # reserved, no slot
        waiting.park(SimpleNamespace(engine_id=name, pinned=vs[name], tenant=tenant))
    assert steps(129.0) == [] and len(waiting) == 2
    manager.release(vs["bob-a"], "bob")  # at 129: a slot frees
    assert steps(130.0) == ["carol-a@130"]  # carol still contends: bob holds his share
    manager.release(vs["carol-a"], "carol")  # at 130: carol's request ends; she contends until 140
    assert steps(139.0) == []
    assert steps(140.0) == ["bob-c@140"] and len(waiting) == 0
    assert vs["bob-c"].slot is not None and vs["carol-a"].slot is None
