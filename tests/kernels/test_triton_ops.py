"""Triton kernels under TRITON_INTERPRET=1: each op against its float64 reference op, and the
composed Triton path against the per-token float64 truth. CI-sized grid; outputs poisoned."""

import pytest
import torch

from kernel_cases import TEST_DEVICE, TOL, delta_error, make_case
from nlora_serve.kernels import reference as ref
from nlora_serve.kernels.triton_ops.bgmv_shrink import bgmv_shrink
from nlora_serve.kernels.triton_ops.mix import mix
from nlora_serve.kernels.triton_ops.sgmv_expand import sgmv_expand
from nlora_serve.kernels.triton_ops.sgmv_shrink import sgmv_shrink
from nlora_serve.kernels.triton_ops.triton_path import apply_triton

DTYPES = (torch.float32, torch.bfloat16)
NAN = float("nan")


def d64(t):
    return None if t is None else t.double()


def rel(got, want, rows):
    """Relative error on the given rows; the other rows must still hold the NaN poison."""
    assert torch.isnan(got[~rows]).all(), "an op wrote a row it does not own"
    got, want = got[rows].double(), want[rows]
    assert not torch.isnan(got).any()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def poisoned(num, rank):
    return torch.full((num, rank), NAN, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fuse", (False, True))
@pytest.mark.parametrize("dist,ranks", (("one", (16, 5)), ("with_none", (16, 5)),
                                        ("one", (64, 5))))
def test_sgmv_shrink(dist, ranks, fuse, dtype):
    # rank 64: the fused mix runs in four 16-column chunks of N (config: no register spills)
    case = make_case(6000 + fuse, 41, 577, 131, ranks, dist, "own", dtype, width=max(ranks) + 4)
    b, s = case.batch(), case.site
    n = s.n_pool if fuse else None
    r = b.max_rank
    got = sgmv_shrink(case.x, s.a_pool, b.slot_families, b.seg_start, b.seg_len, b.seg_slot,
                      b.max_seg_len, poisoned(41, r), n)
    want = ref.sgmv_shrink(d64(case.x), d64(s.a_pool), b.slot_families, b.seg_start, b.seg_len,
                           b.seg_slot, b.max_seg_len, torch.full((41, r), NAN).double(), d64(n))
    assert rel(got, want, case.token_slots >= 0) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", (1, 16, 64))
def test_bgmv_shrink_fused(rank, dtype):
    case = make_case(6100 + rank, 13, 576, 192, (rank,), "with_none", "mixed", dtype)
    b, s = case.batch(), case.site
    got = bgmv_shrink(case.x, s.a_pool, b.tok_group_family, poisoned(13, rank), s.n_pool,
                      b.tok_group_slot)
    want = ref.bgmv_shrink(d64(case.x), d64(s.a_pool), b.tok_group_family,
                           torch.full((13, rank), NAN).double(), d64(s.n_pool), b.tok_group_slot)
    assert rel(got, want, b.tok_group_family >= 0) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", (7, 16, 128))
def test_mix_reads_y_with_bias(rank, dtype):
    case = make_case(6200 + rank, 11, 577, 131, (rank,), "with_none", "tied", dtype, bias=True,
                     fused=True)
    b, s = case.batch(), case.site
    got = mix(case.y, s.n_pool, b.tok_tied_slot, poisoned(11, rank), s.tied_bias)
    want = ref.mix(d64(case.y), d64(s.n_pool), b.tok_tied_slot,
                   torch.full((11, rank), NAN).double(), d64(s.tied_bias))
    assert rel(got, want, b.tok_tied_slot >= 0) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ("distinct", "skewed"))
def test_sgmv_expand_adds_in_place(dist, dtype):
    case = make_case(6300, 37, 576, 131, (16, 3), dist, "own", dtype)
    b, s = case.batch(), case.site
    # A delta a few times |y|, so bf16 rounding of y itself stays well under the tolerance.
    u = 4 * torch.randn(37, b.max_rank, generator=torch.Generator().manual_seed(1))
    y0 = case.y.clone()
    sgmv_expand(u, s.b_pool, b.fseg_start, b.fseg_len, b.fseg_family, b.max_fseg_len,
                b.tok_group_slot, b.slot_scalings, case.y)
    want = ref.sgmv_expand(u.double(), d64(s.b_pool), b.fseg_start, b.fseg_len, b.fseg_family,
                           b.max_fseg_len, b.tok_group_slot, b.slot_scalings, y0.double())
    rows = case.token_slots >= 0
    assert torch.equal(case.y[~rows], y0[~rows])
    assert delta_error(y0[rows], case.y[rows], (want - y0.double())[rows]) <= TOL[dtype]


CASES = [  # (path, dist, T, (in, out), ranks, extras): decode (BGMV) and prefill (SGMV) shapes
    ("tied", "distinct", 19, (576, 192), (16,), {}),
    ("own", "distinct", 17, (576, 576), (16, 1), {}),
    ("shared", "zipf", 23, (577, 131), (7,), {}),
    ("mixed", "with_none", 31, (576, 192), (16, 64), {}),
    ("own", "one", 37, (577, 131), (16,), {}),
    ("mixed", "skewed", 53, (576, 131), (16, 2), {}),
    ("tied", "with_none", 29, (576, 192), (16, 4), {"bias": True, "fused": True, "width": 32}),
    ("mixed", "none", 7, (576, 192), (16,), {}),
]


@pytest.mark.parametrize("group_form", ("grouped", "bgmv"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path,dist,num,shape,ranks,extra", CASES)
def test_triton_path_against_truth(path, dist, num, shape, ranks, extra, dtype, group_form):
    # The one test that also runs compiled on a GPU (NLORA_TEST_DEVICE=cuda, conftest.py).
    case = make_case(7000 + num, num, *shape, ranks, dist, path, dtype, device=TEST_DEVICE,
                     **extra)
    b = case.batch(device=TEST_DEVICE)
    before = case.y.to("cpu", copy=True)
    apply_triton(case.y, case.x, b, case.site, group_form=group_form)
    after = case.y.cpu()
    rows = case.token_slots >= 0
    assert not torch.isnan(after).any()
    assert torch.equal(after[~rows], before[~rows])
    assert delta_error(before, after, case.truth) <= TOL[dtype]
    if dist == "one" and num >= 16 and group_form == "bgmv":
        assert b.max_seg_len >= 16  # this case exercises the SGMV shrink
