"""Pools and residency over real adapters, checked through the kernels against float64 deltas:
tied and LoRA slots freed, reused, evicted and loaded back, pinned slots never evicted, the tied
byte budget. The share rule between tenants contending for LoRA slots is test_lora_slot_share.py."""

from __future__ import annotations

import torch
import pytest

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.runtime.version import AdapterVersion
from nlora_serve.adapters.runtime.residency import PoolFull, Residency
from nlora_serve.adapters.save import write_adapter
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.engine.model.adapter_layer import AdapterHook
from residency_helpers import perturbed, refused, version

pytestmark = pytest.mark.usefixtures("every_refusal_logged")

SITE = (2, "q_proj")


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
    return Residency(base_fp32, lambda p, _hash: read_adapter(p, base_fp32), tied_budget=1 << 30,
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
            r"not free for tenant None for adapter l2 v1 \(its request waits\): all 2 slots \(--max-loras\) are held by running requests")


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
    from nlora_serve.adapters.runtime.residency import AdapterLoadFailed

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
