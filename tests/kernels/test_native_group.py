"""The native CPU op of the group path (kernels/cpu/group_apply.c) against a float64 truth.

One call covers a whole fused projection: every module m's delta s · B_m[f] N_m[s] A_m[f] x[t]
is computed here per token in float64 from the raw per-slot matrices, independently of the pools
and the metadata. Free slots and families are NaN-filled, so a read of one shows up as NaN.
Tied slots mixed into the same pool go through the tied op in the same step, as the hook runs them.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import TOL, draw_slots
from nlora_serve.kernels import TIED, KernelSiteWeights, build_adapter_batch
from nlora_serve.kernels.cpu.native import PARALLEL_MIN_ROWS

DTYPES = (torch.float32, torch.bfloat16)
QKV = (576, 192, 192)


@pytest.fixture(params=("transposed", "pool_bt", "amx"))
def bt_path(request, native_ops, monkeypatch):
    """How the expand gets B^T: transposed per call, the pool's own copy (AVX-512), or on AMX
    tiles (bf16, where the CPU has them: the pools' rank width rounded up to 16 so the op takes
    them). Returns group_case keyword arguments for ranks ``ranks``."""
    amx = request.param == "amx"
    if amx and not native_ops.amx:
        pytest.skip("no AMX-BF16 tiles on this CPU or kernel: its non-AMX bf16 path is the one tested")
    monkeypatch.setattr(native_ops, "amx", amx)
    return lambda ranks: {"pool_bt": request.param != "transposed",
                          "rank_width": -(-max(ranks) // 16) * 16 if amx else None}


def group_case(seed, num_tokens, dim_in, widths, ranks, dist, dtype, *, path="own", skip=(), num_used=None,
               row_pad=0, pool_bt=False, rank_width=None):
    """(y, x, sites, batch, truth): y [T, Σ widths] (a column slice of a wider buffer when
    row_pad > 0). path: "own" (a family per slot), "shared" (every slot on family 1, which holds
    its full rank width), "mixed" (own, shared and Nyström-tied slots). Module indices in
    ``skip`` have no site. ``pool_bt``: the sites carry B^T per family (``b_pool_t``, NaN where
    B is), as the CPU LoRA pool keeps it. ``rank_width``: the pools' R (default max(ranks))."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    num_used = num_used or min(num_tokens, 12)
    num_slots, width, num_fams = num_used + 3, rank_width or max(ranks), num_used + 5
    nan = float("nan")
    x = rnd(num_tokens, dim_in)
    weights = [rnd(w, dim_in, scale=0.5 * dim_in ** -0.5) for w in widths]
    y_base = torch.cat([x @ w.t() for w in weights], dim=1)
    n_pool = torch.full((num_slots, len(widths), width, width), nan, dtype=dtype)
    a_pools = [torch.full((num_fams, width, dim_in), nan, dtype=dtype) for _ in widths]
    b_pools = [torch.full((num_fams, w, width), nan, dtype=dtype) for w in widths]
    shared = [(rnd(width, dim_in, scale=dim_in ** -0.5), rnd(w, width, scale=width ** -0.5)) for w in widths]
    fams = torch.full((num_slots,), 10_000)
    raw = {}  # (slot, module) -> (A [r, in], N [r, r], B [out, r]) in float64
    for slot in range(num_used):
        r = ranks[slot % len(ranks)]
        kind = path if path != "mixed" else ("own", "shared", "tied")[slot % 3]
        fam = {"own": 2 + slot, "shared": 1, "tied": TIED}[kind]
        fams[slot] = fam
        for m, w in enumerate(widths):
            n = rnd(r, r, scale=2 * dim_in ** 0.5 / r if kind == "tied" else r ** -0.5)
            n_pool[slot, m].zero_()[:r, :r] = n.to(dtype)
            if kind == "tied":
                raw[slot, m] = (weights[m][:r].to(dtype).double(), n, weights[m][:, :r].to(dtype).double())
                continue
            if kind == "shared":
                a_full, b_full = shared[m]
                a_pools[m][fam], b_pools[m][fam] = a_full.to(dtype), b_full.to(dtype)
            else:
                a_full, b_full = rnd(width, dim_in, scale=dim_in ** -0.5), rnd(w, width, scale=r ** -0.5)
                a_pools[m][fam].zero_()[:r] = a_full[:r].to(dtype)
                b_pools[m][fam].zero_()[:, :r] = b_full[:, :r].to(dtype)
            raw[slot, m] = (a_full[:r].to(dtype).double(), n.to(dtype).double(), b_full[:, :r].to(dtype).double())
    ranks_t = torch.tensor([ranks[s % len(ranks)] for s in range(num_used)] + [1 << 30] * 3)
    scal = torch.rand(num_slots, generator=gen) + 0.5
    slots = draw_slots(gen, num_tokens, num_used, dist)
    xd = x.to(dtype)
    wide = torch.full((num_tokens, sum(widths) + row_pad), nan, dtype=dtype)
    y = wide[:, :sum(widths)]
    y.copy_(y_base.to(dtype))
    truth = torch.zeros(num_tokens, sum(widths), dtype=torch.float64)
    offs = [sum(widths[:m]) for m in range(len(widths))]
    for t in range(num_tokens):
        s = int(slots[t])
        for m in range(len(widths)):
            if s < 0 or m in skip:
                continue
            a, n, b = raw[s, m]
            # Tied z is the base output's own first r columns (as rounded into y), else A x.
            z = y[t, offs[m]:offs[m] + a.shape[0]].double() if fams[s] == TIED else a @ xd[t].double()
            truth[t, offs[m]:offs[m] + widths[m]] = float(scal[s]) * (b @ (n @ z))
    sites = [None if m in skip else
             KernelSiteWeights(n_pool=n_pool[:, m], a_pool=a_pools[m], b_pool=b_pools[m],
                         tied_b=weights[m].to(dtype)[:, :width] if path == "mixed" else None,
                         b_pool_t=b_pools[m].transpose(1, 2).contiguous() if pool_bt else None)
             for m in range(len(widths))]
    batch = build_adapter_batch(slots, ranks_t, scal, fams)
    return y, xd, sites, batch, truth


def run(native_ops, y, x, sites, batch, truth, widths):
    """Both native ops as the hook runs them; the relative error of the delta."""
    plan = native_ops.plan_group(sites, list(widths))
    assert plan is not None
    assert (plan.bt_ptrs is not None) == all(s.b_pool_t is not None for s in sites if s is not None)
    site = next(s for s in sites if s is not None)
    assert plan.amx == (native_ops.amx and y.dtype == torch.bfloat16 and plan.bt_ptrs is not None
                        and x.shape[1] % 32 == 0 and site.rank_width % 16 == 0), "not the path under test"
    before = y.clone()
    if batch.num_tied:
        native_ops.tied_apply(y, batch, native_ops.plan(sites, list(widths)))
    assert native_ops.group_apply(y, x, batch, plan) is y
    assert not torch.isnan(y).any(), "a NaN from a free slot or family leaked"
    untouched = batch.token_slots < 0
    assert torch.equal(y[untouched], before[untouched]), "a slot −1 row changed"
    err = (y.double() - before.double() - truth).norm()
    return float(err / truth.norm()) if truth.norm() > 0 else float(err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ((576, QKV), (576, (1536, 1536)), (1536, (576,)), (577, (577,)),
                                   (13, (130, 9)), (40, (15,))), ids=str)
@pytest.mark.parametrize("ranks", ((1,), (7,), (16,), (64,), (128,), (1, 7, 16, 33)), ids=str)
def test_ranks_and_widths(native_ops, ranks, shape, dtype, bt_path):
    dim_in, widths = shape
    case = group_case(10 + max(ranks) + dim_in + sum(widths), 37, dim_in, widths, ranks, "zipf", dtype,
                      **bt_path(ranks))
    assert run(native_ops, *case, widths) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", (1, 2, 5, 31, 33, 67, 257))
@pytest.mark.parametrize("dist", ("distinct", "one", "zipf", "skewed", "with_none"))
def test_token_counts_and_popularity(native_ops, num_tokens, dist, dtype, bt_path):
    case = group_case(300 + num_tokens, num_tokens, 576, QKV, (16,), dist, dtype, num_used=min(num_tokens, 40),
                      **bt_path((16,)))
    assert run(native_ops, *case, QKV) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ("shared", "mixed"))
@pytest.mark.parametrize("ranks", ((16,), (4, 16, 33)), ids=str)
def test_shared_family_and_tied_in_one_step(native_ops, path, ranks, dtype, bt_path):
    """One family serving many slots (its pool rows hold entries beyond a slot's rank), and tied
    plus group slots of one pool in the same step: tied rows by the tied op, group rows by this."""
    case = group_case(400 + len(ranks), 61, 576, QKV, ranks, "with_none", dtype, path=path, num_used=20,
                      **bt_path(ranks))
    assert run(native_ops, *case, QKV) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_skipped_module_and_row_stride(native_ops, dtype, bt_path):
    """A module without a site (its columns untouched) and y a column slice of a wider buffer."""
    y, x, sites, batch, truth = group_case(500, 29, 576, QKV, (16, 4), "with_none", dtype, skip=(1,),
                                           row_pad=40, **bt_path((16, 4)))
    assert y.stride(0) == sum(QKV) + 40
    k_cols = y[:, 576:768].clone()
    assert run(native_ops, y, x, sites, batch, truth, QKV) <= TOL[dtype]
    assert torch.equal(y[:, 576:768], k_cols)


def test_no_group_token_leaves_y_bitwise(native_ops):
    y, x, sites, batch, _ = group_case(600, 13, 576, (576,), (16,), "none", torch.bfloat16)
    before = y.clone()
    native_ops.group_apply(y, x, batch, native_ops.plan_group(sites, [576]))
    assert torch.equal(y, before)


def test_plan_group_refuses_what_it_cannot_serve(native_ops):
    y, x, sites, batch, _ = group_case(700, 5, 576, (576,), (16,), "one", torch.float32)
    tied = KernelSiteWeights(n_pool=sites[0].n_pool, tied_b=torch.zeros(576, 16))
    assert native_ops.plan_group([tied], [576]) is None  # tied pools: the tied op's
    assert native_ops.plan_group([None], [576]) is None
    assert native_ops.plan_group(sites, [575]) is None  # B's out disagrees with the width
    plan = native_ops.plan_group(sites, [576])
    with pytest.raises(ValueError, match="unit column stride"):
        native_ops.group_apply(y.t().contiguous().t(), x, batch, plan)
    with pytest.raises(ValueError, match="x must be"):
        native_ops.group_apply(y, x[:, :500], batch, plan)
    with pytest.raises(ValueError, match="float32"):
        native_ops.group_apply(y.to(torch.bfloat16), x, batch, plan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_sized_steps_split_over_threads(native_ops, dtype, bt_path):
    """≥ PARALLEL_MIN_ROWS group tokens run as one call per thread over disjoint tokens: the
    same truth, and the same bits as one thread."""
    num_tokens = 2 * PARALLEL_MIN_ROWS + 37
    one = group_case(9, num_tokens, 576, QKV, (4, 16, 33), "zipf", dtype, num_used=40, **bt_path((4, 16, 33)))
    split = [t.clone() if isinstance(t, torch.Tensor) else t for t in one]
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run(native_ops, *one, QKV) <= TOL[dtype]
        torch.set_num_threads(2)
        assert run(native_ops, *split, QKV) <= TOL[dtype]
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one[0], split[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranks", ((16,), (1, 7, 16, 33)), ids=str)
def test_pool_bt_gives_the_transposing_path_bit_for_bit(native_ops, monkeypatch, dtype, ranks):
    """The pool's own B^T (bf16 widened on load) against the per-call fp32 transpose: the same
    values in the same order, so the same bits (both on AVX-512)."""
    monkeypatch.setattr(native_ops, "amx", False)
    widths = (1536, 1536)
    got = {}
    for pool_bt in (False, True):
        y, x, sites, batch, _ = group_case(800, 67, 576, widths, ranks, "zipf", dtype, num_used=9, pool_bt=pool_bt)
        got[pool_bt] = native_ops.group_apply(y, x, batch, native_ops.plan_group(sites, list(widths)))
    assert torch.equal(got[False], got[True])


def test_plan_group_ignores_a_pool_bt_of_another_layout(native_ops):
    _, _, sites, _, _ = group_case(801, 5, 576, (576,), (16,), "one", torch.float32, pool_bt=True)
    site = sites[0]
    wider = torch.zeros(site.b_pool_t.shape[0], site.b_pool_t.shape[1], 600)[:, :, :576]  # rows 600 apart
    odd = KernelSiteWeights(n_pool=site.n_pool, a_pool=site.a_pool, b_pool=site.b_pool, b_pool_t=wider)
    assert native_ops.plan_group([odd], [576]).bt_ptrs is None  # transposes per call instead
    with pytest.raises(ValueError, match="b_pool_t must be"):
        KernelSiteWeights(n_pool=site.n_pool, a_pool=site.a_pool, b_pool=site.b_pool, b_pool_t=site.b_pool)
