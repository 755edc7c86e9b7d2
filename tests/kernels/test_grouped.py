"""The grouped (SGMV-style) group path under TRITON_INTERPRET=1: kernels/triton_ops/grouped_shrink.py and
grouped_expand.py over family-sorted tokens (metadata.sort_group_tokens), against the per-token
float64 truth of kernel_cases.py (s · B N A x from the raw per-slot matrices) and the float64
reference ops. Slot mixes: one slot, all distinct, Zipf, one hot tenant with −1 tokens, no group
token at all, tied and group tokens mixed; mixed ranks with each slot's rank given, and NaN in
every pool entry beyond a slot's rank, so a kernel that pads to the widest rank reads NaN; K split
over programs (atomic partial sums) and not (K = 40); bf16 and fp32; token counts over several
16-token blocks, prime sizes."""

import pytest
import torch

from kernel_cases import TEST_DEVICE, TOL, delta_error, make_case
from nlora_serve.kernels import reference as ref
from nlora_serve.kernels.triton_ops.per_token_batch import derive_per_token_batch
from nlora_serve.kernels.triton_ops.grouped_expand import grouped_expand
from nlora_serve.kernels.triton_ops.grouped_shrink import grouped_shrink
from nlora_serve.kernels.metadata import NO_GROUP_KEY, TIED, sort_group_tokens
from nlora_serve.kernels.triton_ops.triton_path import apply_triton, apply_triton_per_token

DTYPES = (torch.float32, torch.bfloat16)
NAN = float("nan")
CASES = [  # (path, dist, T, (in, out), ranks, extras)
    ("own", "one", 37, (577, 131), (16,), {}),
    ("own", "distinct", 41, (577, 131), (16, 5), {}),
    ("shared", "zipf", 23, (40, 192), (7, 16), {}),  # K = 40: one K range, a plain store
    ("own", "with_none", 29, (576, 97), (64, 1), {}),
    ("mixed", "skewed", 53, (577, 131), (16, 2, 9), {}),
    ("mixed", "distinct", 19, (64, 96), (32,), {"fused": True}),
    ("own", "none", 7, (576, 131), (16,), {}),
]


def test_sort_group_tokens_hand_computed():
    order, key = sort_group_tokens(torch.tensor([3, -1, 0, 3, 1, -1, 0], dtype=torch.int32))
    assert order.tolist() == [2, 6, 4, 0, 3, 1, 5]  # stable: equal families keep token order
    assert key.tolist() == [0, 0, 1, 3, 3, NO_GROUP_KEY, NO_GROUP_KEY]
    assert order.dtype == key.dtype == torch.int32


def _poison_beyond_rank(case):
    """NaN in every group slot's N, A and B entries beyond its own rank (its own family only)."""
    site = case.site
    for slot in range(int((case.slot_ranks < 1 << 30).sum())):
        r, fam = int(case.slot_ranks[slot]), int(case.slot_families[slot])
        if fam == TIED:
            continue
        site.n_pool[slot, r:], site.n_pool[slot, :, r:] = NAN, NAN
        if fam >= 2:  # an own family (kernel_cases: 2 + slot); the shared one holds its widest rank
            site.a_pool[fam, r:], site.b_pool[fam, :, r:] = NAN, NAN


def _per_token_batch(case, dev):
    families = case.slot_families.to(dev, torch.int32)
    return derive_per_token_batch(case.token_slots.to(dev, torch.int32), families,
                                  case.slot_scalings.to(dev, torch.float32), case.site.rank_width,
                                  bool((case.slot_families == TIED).any()), bool((case.slot_families >= 0).any()),
                                  slot_ranks=case.slot_ranks.clamp(max=1 << 30).to(dev, torch.int32))


def assert_delta_matches_truth(case, before: torch.Tensor, dtype) -> None:
    """No NaN from a poisoned pool entry, non-adapted rows bitwise untouched, the delta within
    TOL of the float64 truth."""
    after = case.y.cpu()
    rows = case.token_slots >= 0
    assert not torch.isnan(after).any()
    assert torch.equal(after[~rows], before[~rows])
    assert delta_error(before, after, case.truth) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path,dist,num,shape,ranks,extra", CASES)
def test_grouped_decode_path_against_truth(path, dist, num, shape, ranks, extra, dtype):
    case = make_case(8100 + num, num, *shape, ranks, dist, path, dtype, device=TEST_DEVICE, **extra)
    _poison_beyond_rank(case)
    batch = _per_token_batch(case, torch.device(TEST_DEVICE))
    before = case.y.to("cpu", copy=True)
    apply_triton_per_token(case.y, case.x, batch, case.site, group_form="grouped")
    assert_delta_matches_truth(case, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path,dist,num,shape,ranks,extra", CASES[1:5])
def test_grouped_prefill_form_against_truth(path, dist, num, shape, ranks, extra, dtype):
    # apply_triton: the host-built AdapterBatch, its per-step slot ranks and batch-wide rank
    case = make_case(8200 + num, num, *shape, ranks, dist, path, dtype, device=TEST_DEVICE, **extra)
    _poison_beyond_rank(case)
    before = case.y.to("cpu", copy=True)
    apply_triton(case.y, case.x, case.batch(device=TEST_DEVICE), case.site, group_form="grouped")
    assert_delta_matches_truth(case, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim_in", (577, 40))  # K split over programs (atomic adds), and one K range
def test_grouped_ops_against_reference_ops(dim_in, dtype):
    case = make_case(8300 + dim_in, 43, dim_in, 150, (16, 3), "with_none", "mixed", dtype, device=TEST_DEVICE)
    _poison_beyond_rank(case)
    b = _per_token_batch(case, torch.device(TEST_DEVICE))
    s, rank = case.site, b.rank
    u = grouped_shrink(case.x, s.a_pool, s.n_pool, b.group_order, b.group_key, b.tok_group_slot,
                       torch.full((43, rank), NAN, device=TEST_DEVICE), b.slot_ranks).cpu()
    cpu = [t.cpu() for t in (b.group_order, b.group_key, b.tok_group_slot)]
    want_u = ref.grouped_shrink(d64(case.x), d64(s.a_pool), d64(s.n_pool), *cpu,
                                torch.full((43, rank), NAN, dtype=torch.float64), b.slot_ranks.cpu())
    sorted_rows = cpu[1] != NO_GROUP_KEY
    err = (u[sorted_rows].double() - want_u[sorted_rows]).norm() / want_u[sorted_rows].norm()
    assert err <= TOL[dtype]
    y0 = case.y.to("cpu", copy=True)
    grouped_expand(want_u.float().to(TEST_DEVICE), s.b_pool, b.group_order, b.group_key, b.tok_group_slot, case.y,
                   b.slot_scalings, b.slot_ranks)
    want_y = ref.grouped_expand(want_u, d64(s.b_pool), *cpu, y0.double(), b.slot_scalings.cpu(), b.slot_ranks.cpu())
    rows = cpu[2] >= 0
    after = case.y.cpu()
    assert rows.any() and not rows.all()
    assert torch.equal(after[~rows], y0[~rows])
    assert delta_error(y0[rows], after[rows], (want_y - y0.double())[rows]) <= TOL[dtype]


def d64(t):
    return t.cpu().double()


def test_grouped_refuses_bad_arguments():
    x, y, u = torch.zeros(4, 8), torch.zeros(4, 6), torch.zeros(4, 2)
    idx = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="a_pool"):
        grouped_shrink(x, torch.zeros(1, 2, 9), torch.zeros(1, 2, 2), idx, idx, idx, u)
    with pytest.raises(TypeError, match="out must be float32"):
        grouped_shrink(x, torch.zeros(1, 2, 8), torch.zeros(1, 2, 2), idx, idx, idx, u.double())
    with pytest.raises(ValueError, match="order has 3 tokens"):
        grouped_expand(u, torch.zeros(1, 6, 2), idx[:3], idx, idx, y)
    with pytest.raises(ValueError, match="b_pool"):
        grouped_expand(u, torch.zeros(1, 7, 2), idx, idx, idx, y)
    case = make_case(8400, 5, 40, 32, (16,), "distinct", "own", torch.float32)
    batch = _per_token_batch(case, torch.device("cpu"))
    with pytest.raises(ValueError, match="group_form"):
        apply_triton_per_token(case.y, case.x, batch, case.site, group_form="sgmv")
