"""Pools and residency over real adapters, checked through the kernels against float64 deltas."""

from __future__ import annotations

import logging
import re

import torch
import pytest

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.version import AdapterVersion
from nlora_serve.adapters.residency import PoolFull, Residency, SlotBusy
from nlora_serve.adapters.save import write_adapter
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.engine.adapter_layer import AdapterHook

SITE = (2, "q_proj")


def perturbed(adapter: Adapter, seed: int, scale: float = 0.05) -> Adapter:
    """Give every site a distinct N (and B for SLoRA, whose B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    for s in adapter.sites.values():
        s.N = s.N + scale * torch.randn(s.N.shape, generator=gen, dtype=s.N.dtype)
        s.has_n = True
        if not adapter.is_tied:
            s.B = s.B + scale * torch.randn(s.B.shape, generator=gen, dtype=s.B.dtype)
    return adapter


def version(name: str, adapter: Adapter, path=None) -> AdapterVersion:
    return AdapterVersion(name, 1, adapter, path)


@pytest.fixture(autouse=True)
def every_refusal_logged(monkeypatch):
    """Each refusal's log line is checked here: none held back by RefusalLog's 10 s per tenant."""
    from nlora_serve import errors

    monkeypatch.setattr(errors, "REFUSAL_LOG_SECONDS", 0.0)


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


def refused(caplog, call, name: str, detail: str) -> None:
    """``call`` is refused a LoRA slot for adapter ``name`` for now (SlotBusy: the native engine keeps
    the request waiting for one, tests/engine/test_lora_slot_wait.py), in one fixed text that names its
    adapter only (no count, no other tenant, no waiting), whether every slot is held or its share is,
    and the operator's INFO log line matches ``detail``."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nlora_serve.adapters.residency"):
        with pytest.raises(SlotBusy) as err:
            call()
    text = str(err.value)
    assert text == f"adapter {name!r}: no LoRA adapter slot is free for it now (the server is busy); retry shortly"
    rest = text.replace(repr(name), "")
    assert not any(c.isdigit() for c in rest) and not any(w in rest for w in ("bob", "carol", "tenant", "wait"))
    assert re.search(detail, caplog.text), caplog.text


def reference_delta(adapter: Adapter | None, x: torch.Tensor) -> torch.Tensor:
    """s·B N A x (+ s·b) at SITE in float64, straight from the adapter's own tensors."""
    site = adapter.sites.get(SITE) if adapter is not None else None
    if site is None:
        return torch.zeros(x.shape[0], 576, dtype=torch.float64)
    delta = x.to(torch.float64) @ site.delta().t()
    return delta if site.bias is None else delta + site.bias_delta()


class _ServesNothing:
    """Native ops that take no projection: every step builds the native ops' lean batch
    (kernels/cpu/batch.py) and then falls back to the torch path, which needs the full one."""

    def plan(self, sites, widths):
        return None

    plan_group = plan


@pytest.fixture(params=["torch", "native", "native-fallback"])
def hook(request):
    """The adapter layer on the torch path, with the native CPU ops, and with native ops that
    serve no projection (the torch path behind the native path's step setup)."""
    native = {"torch": None, "native": lambda: request.getfixturevalue("native_ops"),
              "native-fallback": _ServesNothing}[request.param]
    return AdapterHook(native() if native else None)


def run_site(hook, base, versions, lens, x):
    """Base output + hook at SITE; returns the delta the hook added."""
    hook.begin_step(versions, lens, x.device)
    y = x @ base.weight(*SITE).t()
    before = y.clone()
    hook(x, y, SITE[0], (SITE[1],), [y.shape[1]])
    return (y - before).to(torch.float64)


@pytest.fixture
def residency(base_fp32):
    return Residency(base_fp32, lambda p: read_adapter(p, base_fp32), tied_budget=1 << 30,
                     max_loras=2, max_rank=16)


def test_mixed_tied_and_lora_tokens_match_float64(hook, base_fp32, residency, tmp_path):
    tied = [perturbed(init_adapter(base_fp32, rank=8, targets=["q_proj", "v_proj"]), s) for s in (1, 2)]
    lora = perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", alpha=8), 3)
    versions = [version(f"t{i}", a) for i, a in enumerate(tied)] + [version("l", lora)]
    for v in versions:
        residency.admit(v)
    order = [versions[0], None, versions[2], versions[1], versions[0]]
    lens = [3, 2, 5, 1, 4]
    x = torch.randn(sum(lens), 576, generator=torch.Generator().manual_seed(0))
    got = run_site(hook, base_fp32, order, lens, x)
    want = torch.cat([reference_delta(v.adapter if v else None, x[sum(lens[:i]):sum(lens[:i + 1])])
                      for i, v in enumerate(order)])
    assert got[3:5].abs().max() == 0  # base-model tokens untouched
    assert (got - want).norm() / want.norm() < 1e-5


def test_freed_tied_slot_is_reused_without_leaking(hook, base_fp32, residency):
    first = version("a", perturbed(init_adapter(base_fp32, rank=8, targets=["q_proj"]), 1))
    residency.admit(first)
    slot, pool = first.slot, first.pool
    residency.free(first)
    pool.n[slot] = float("nan")  # whatever a free slot holds must not matter
    second = version("b", perturbed(init_adapter(base_fp32, rank=8, targets=["q_proj"]), 2))
    residency.admit(second)
    assert second.slot == slot
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(1))
    got = run_site(hook, base_fp32, [second], [6], x)
    want = reference_delta(second.adapter, x)
    assert (got - want).norm() / want.norm() < 1e-5


def test_nan_in_a_free_slot_never_reaches_other_tokens(hook, base_fp32, residency):
    live = version("a", perturbed(init_adapter(base_fp32, rank=8, targets=["q_proj"]), 1))
    residency.admit(live)
    live.pool.n[live.slot + 1:] = float("nan")
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(2))
    got = run_site(hook, base_fp32, [live, None], [3, 2], x)
    assert torch.isfinite(got).all()
    want = reference_delta(live.adapter, x[:3])
    assert (got[:3] - want).norm() / want.norm() < 1e-5


def test_evict_then_reload_gives_identical_outputs(hook, base_fp32, residency, tmp_path):
    loras = [perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=s), s)
             for s in range(3)]
    versions = []
    for i, a in enumerate(loras):  # stored on disk so an evicted one can be re-read
        path = write_adapter(a, tmp_path / f"l{i}")
        versions.append(version(f"l{i}", read_adapter(path, base_fp32), path))
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(3))
    residency.admit(versions[0])
    before = run_site(hook, base_fp32, [versions[0]], [4], x)
    residency.admit(versions[1])
    residency.admit(versions[2])  # two slots: evicts v0, the least recently used
    assert versions[0].slot is None and versions[0].adapter is None
    residency.ensure_resident(versions[0])  # cold load from its folder
    assert residency.cold_loads == 1
    after = run_site(hook, base_fp32, [versions[0]], [4], x)
    assert torch.equal(before, after)


def test_reused_lora_slot_serves_the_new_adapter(hook, base_fp32, residency):
    """An evicted LoRA's slot rewritten by another: its A, B and (on the CPU) the B^T copy the native
    op reads are the new adapter's, seen by the next step on the plans the hook already holds."""
    loras = [version(f"l{s}", perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora",
                                                     seed=s), s)) for s in range(3)]
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(4))
    residency.admit(loras[0])
    residency.admit(loras[1])
    run_site(hook, base_fp32, [loras[0]] * 4, [1] * 4, x)  # four decode rows: the plans are built
    slot = loras[0].slot
    residency.admit(loras[2])  # evicts l0, the least recently used, into its slot
    assert loras[2].slot == slot and loras[0].slot is None
    pool = loras[2].pool
    site = pool.kernel_site(SITE)
    assert torch.equal(site.b_pool_t[slot], site.b_pool[slot].t())
    got = run_site(hook, base_fp32, [loras[2]] * 4, [1] * 4, x)
    want = reference_delta(loras[2].adapter, x)
    # fp32 rounding of y = W x + delta, read back as y − W x (measured 1.1e-5); l0's stale B would
    # be off by the whole delta (relative error ~1)
    assert (got - want).norm() / want.norm() < 1e-4


@pytest.mark.parametrize("held_by", ["request", "holds"])  # a running request; a response's requests to come
def test_pinned_lora_slots_are_never_evicted(base_fp32, residency, tmp_path, caplog, held_by):
    vs = []
    for i in range(3):
        a = perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=i), i)
        vs.append(version(f"l{i}", a, write_adapter(a, tmp_path / f"l{i}")))
    for v in vs[:2]:
        residency.admit(v)
        if held_by == "request":
            v.refcount = 1
            residency.ensure_resident(v)
        else:
            v.holds = 1
    residency.admit(vs[2])  # no evictable slot: stays on disk for now
    assert vs[2].slot is None
    refused(caplog, lambda: residency.ensure_resident(vs[2]), "l2",
            r"refused to tenant None for adapter l2 v1: all 2 slots \(--max-loras\) are held by running requests")


def test_a_request_waiting_for_a_slot_keeps_none(base_fp32, residency, tmp_path):
    """A request refused a slot waits with its version reserved (refcount 1, no residency pin). With
    the registry's refcount as the eviction rule, a request refused its share on a resident idle
    version kept that slot from every other tenant while it could not use it; residency's pins
    decide now: l0, reserved only, is evicted for l2."""
    vs = []
    for i in range(3):
        a = perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=i), i)
        vs.append(version(f"l{i}", a, write_adapter(a, tmp_path / f"l{i}")))
    for v in vs[:2]:
        residency.admit(v)
    vs[0].refcount = 1  # reserved by a waiting request
    vs[1].refcount = 1
    residency.ensure_resident(vs[1])  # l1 runs
    vs[2].refcount = 1
    residency.ensure_resident(vs[2])
    assert (vs[0].slot, vs[0].adapter) == (None, None) and {vs[1].slot, vs[2].slot} == {0, 1}


def test_a_failed_cold_load_gives_its_slot_back(base_fp32, residency, tmp_path):
    """The slot taken (an idle adapter evicted for it) stayed taken when the re-read failed: each
    failure cost a slot for good, and once --max-loras of them were gone every untied adapter of
    every tenant was PoolFull ("held by running requests", with none running)."""
    from nlora_serve.adapters.residency import AdapterLoadFailed

    vs = []
    for i in range(3):
        a = perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=i), i)
        vs.append(version(f"l{i}", a, write_adapter(a, tmp_path / f"l{i}")))
        residency.admit(vs[-1])  # l2 evicts l0 (nothing holds either)
    assert vs[0].slot is None and vs[0].adapter is None
    (vs[0].path / "adapter_model.safetensors").unlink()  # its file is gone from the disk since
    for _ in range(3):  # more failures than slots
        with pytest.raises(AdapterLoadFailed) as err:
            residency.ensure_resident(vs[0])
        assert str(err.value) == ("adapter 'l0' v1 could not be loaded back from this server's adapter store (the "
                                  "server's log says why): an operator must upload or swap it again")
    assert residency.lora_pool.used == 1  # only l2 (l1 was evicted for the failed loads)
    for v in vs[1:]:
        residency.ensure_resident(v)
        v.refcount = 1
    assert {v.slot for v in vs[1:]} == {0, 1} and residency.lora_pool.used == 2


def test_tied_budget_refuses_the_tenant_that_would_exceed_it(base_fp32):
    res = Residency(base_fp32, None, tied_budget=3 * 1 * 8 * 8 * 4, max_loras=1, max_rank=16)
    tenants = [version(f"t{i}", init_adapter(base_fp32, rank=8, targets=["q_proj"], layers=[0])) for i in range(4)]
    for v in tenants[:3]:
        res.admit(v)
    with pytest.raises(PoolFull, match=r"would need 1024 bytes, over the budget of 768 bytes"):
        res.admit(tenants[3])
    assert res.tied_bytes == 768


def test_ten_thousand_tied_tenants_use_r2_sites_bytes_each(base_fp32):
    # In-memory registration at the default example's shape: r=16 on all seven projections.
    tenant = init_adapter(base_fp32, rank=16, targets="all-linear")
    sites, r, nbytes = 30 * 7, 16, 4
    per_tenant = sites * r * r * nbytes
    res = Residency(base_fp32, None, tied_budget=10_000 * per_tenant, max_loras=1, max_rank=16)
    for i in range(10_000):
        res.admit(AdapterVersion(f"t{i}", 1, tenant, None))
    assert per_tenant == 215_040
    assert res.tied_bytes == 10_000 * per_tenant
    pool = next(iter(res.tied_pools.values()))
    assert pool.used == 10_000 and pool.n.nbytes == pool.capacity * per_tenant


def test_a_tenant_holding_every_lora_slot_yields_one_to_a_tenant_refused_one(base_fp32, tmp_path, caplog):
    """A hostile tenant granted max_loras untied adapters kept every slot pinned with one long
    request per adapter, each replaced the moment it ended (its adapter still resident, so it never
    even looked for a slot): every other tenant's untied adapter was PoolFull for as long as it
    liked (a live server: carol refused 429 on every try). Now a tenant refused a slot contends for
    the slots while it keeps asking (its requests wait in the engine, which asks again between
    steps), and a tenant holding its share (2 slots / 2 tenants) takes no other meanwhile."""
    res = Residency(base_fp32, lambda p: read_adapter(p, base_fp32), tied_budget=1 << 30, max_loras=2,
                    max_rank=16, tenant_shares={})
    vs = {}
    for i, name in enumerate(("bob-a", "bob-b", "carol-a", "carol-b")):
        a = perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=i), i)
        vs[name] = version(name, a, write_adapter(a, tmp_path / name))
        res.admit(vs[name])

    def pin(name, tenant):  # a request of ``tenant`` on ``name``: the registry's pin, then residency's
        vs[name].refcount += 1
        try:
            res.ensure_resident(vs[name], tenant)
        except PoolFull:
            vs[name].refcount -= 1
            raise

    def unpin(name, tenant):
        res.unpin(vs[name], tenant)
        vs[name].refcount -= 1

    pin("bob-a", "bob")
    pin("bob-b", "bob")  # alone, bob may hold every slot
    refused(caplog, lambda: pin("carol-a", "carol"), "carol-a",
            r"refused to tenant 'carol' for adapter carol-a v1: all 2 slots \(--max-loras\) are held by running")
    unpin("bob-a", "bob")  # bob's request on bob-a ends and bob sends the next at once
    refused(caplog, lambda: pin("bob-a", "bob"), "bob-a",
            r"refused to tenant 'bob' for adapter bob-a v1: its requests hold 1 of the 2 slots \(--max-loras\), "
            r"its share 1 while tenants \['carol'\] wait for one")
    pin("carol-a", "carol")  # carol's retry takes bob-a's slot
    assert vs["carol-a"].slot is not None and vs["bob-a"].slot is None
    pin("carol-a", "carol")  # a second request on a version carol holds takes no further slot
    unpin("carol-a", "carol")
    # one slot each while carol contends: bob contends for a second one
    refused(caplog, lambda: pin("bob-a", "bob"), "bob-a", "tenant 'bob' for adapter bob-a v1: its requests hold 1 of")
    unpin("bob-b", "bob")
    pin("carol-a", "carol")
    # carol, at her share, yields the slot bob-b left to bob, who waits
    refused(caplog, lambda: pin("carol-b", "carol"), "carol-b",
            r"tenant 'carol' for adapter carol-b v1: its requests hold 1 of the 2 slots .* tenants \['bob'\] wait")
    pin("bob-a", "bob")
    assert vs["bob-a"].slot is not None and vs["bob-b"].slot is None and vs["carol-a"].slot is not None



def test_a_tenant_contends_for_lora_slots_until_ten_seconds_after_its_last_request_ended(base_fp32, tmp_path,
                                                                                          monkeypatch, caplog):
    """Counted from a request's start, carol's contention lapsed while her request ran (12 s on a
    loaded 2-core server) and bob took her slot back the moment it ended: 7 of her 84 one-second
    retries got through in 2 minutes, 40 of 57 counted from its end."""
    from nlora_serve.adapters import residency as residency_module

    clock = [100.0]
    monkeypatch.setattr(residency_module.time, "monotonic", lambda: clock[0])
    res = Residency(base_fp32, lambda p: read_adapter(p, base_fp32), tied_budget=1 << 30, max_loras=2,
                    max_rank=16, tenant_shares={})
    vs = {}
    for i, name in enumerate(("bob-a", "bob-b", "carol-a")):
        a = perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=i), i)
        vs[name] = version(name, a, write_adapter(a, tmp_path / name))
        res.admit(vs[name])

    def pin(name, tenant, at):
        clock[0] = at
        vs[name].refcount += 1
        try:
            res.ensure_resident(vs[name], tenant)
        except PoolFull:
            vs[name].refcount -= 1
            raise

    def unpin(name, tenant, at):
        clock[0] = at
        res.unpin(vs[name], tenant)
        vs[name].refcount -= 1

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
    res = Residency(base_fp32, lambda p: read_adapter(p, base_fp32), tied_budget=1 << 30, max_loras=2,
                    max_rank=16, tenant_shares={})
    vs = {}
    for i, name in enumerate(("bob-a", "bob-b", "carol-a")):
        a = perturbed(init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", seed=i), i)
        vs[name] = version(name, a, write_adapter(a, tmp_path / name))
        res.admit(vs[name])

    def pin(name, tenant):  # a request of ``tenant`` on ``name``: the registry's pin, then residency's
        vs[name].refcount += 1
        try:
            res.ensure_resident(vs[name], tenant)
        except PoolFull:
            vs[name].refcount -= 1
            raise

    def unpin(name, tenant):
        res.unpin(vs[name], tenant)
        vs[name].refcount -= 1

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
            r"tenant 'bob' for adapter bob-b v1: its requests hold 1 of the 2 slots")
