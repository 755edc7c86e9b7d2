"""The fixed-grid decode path (kernels/triton_ops/per_token_batch.py, bgmv_expand, apply_triton_per_token) under
TRITON_INTERPRET=1: metadata against hand-computed keys, the expand against its float64 reference
op, and the composed path against the per-token float64 truth of every Triton-path case."""

import pytest
import torch
from test_triton_ops import CASES, DTYPES, d64

from kernel_cases import TEST_DEVICE, TOL, delta_error, make_case
from nlora_serve.kernels import reference as ref
from nlora_serve.kernels.triton_ops.bgmv_expand import bgmv_expand
from nlora_serve.kernels.triton_ops.per_token_batch import derive_per_token_batch
from nlora_serve.kernels.metadata import TIED
from nlora_serve.kernels.triton_ops.triton_path import apply_triton_per_token


def test_derived_keys_equal_hand_computed():
    slots = torch.tensor([2, -1, 0, 1, 2, 3], dtype=torch.int32)
    families = torch.tensor([TIED, 5, TIED, 0], dtype=torch.int32)
    b = derive_per_token_batch(slots, families, torch.ones(4), 16, True, True)
    assert b.tok_tied_slot.tolist() == [2, -1, 0, -1, 2, -1]
    assert b.tok_group_slot.tolist() == [-1, -1, -1, 1, -1, 3]
    assert b.tok_group_family.tolist() == [-1, -1, -1, 5, -1, 0]
    with pytest.raises(ValueError, match="token_slots"):
        derive_per_token_batch(slots.long(), families, torch.ones(4), 16, True, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist,with_family,scaled", (("distinct", True, True), ("with_none", True, False),
                                                     ("skewed", False, True)))
def test_bgmv_expand_adds_in_place(dist, with_family, scaled, dtype):
    case = make_case(6400, 29, 576, 131, (16, 3), dist, "own", dtype)
    b, s = case.batch(), case.site
    u = 4 * torch.randn(29, b.max_rank, generator=torch.Generator().manual_seed(2))
    y0 = case.y.clone()
    fam = b.tok_group_family if with_family else None
    b_pool = s.b_pool if with_family else s.b_pool[3:4]  # one shared B, as the tied path's W[:, :R]
    scalings = b.slot_scalings if scaled else None
    bgmv_expand(u, b_pool, fam, b.tok_group_slot, case.y, scalings)
    want = ref.bgmv_expand(u.double(), d64(b_pool), fam, b.tok_group_slot, y0.double(), scalings)
    rows = b.tok_group_slot >= 0
    assert torch.equal(case.y[~rows], y0[~rows])
    assert delta_error(y0[rows], case.y[rows], (want - y0.double())[rows]) <= TOL[dtype]


def test_bgmv_expand_refuses_bad_shapes():
    y = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="b_pool"):
        bgmv_expand(torch.zeros(4, 2), torch.zeros(1, 9, 2), None, torch.zeros(4, dtype=torch.int32), y)
    with pytest.raises(TypeError, match="y must be"):
        bgmv_expand(torch.zeros(4, 2), torch.zeros(1, 8, 2, dtype=torch.bfloat16), None,
                    torch.zeros(4, dtype=torch.int32), y)


@pytest.mark.parametrize("group_form", ("grouped", "bgmv"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path,dist,num,shape,ranks,extra", CASES)
def test_per_token_path_against_truth(path, dist, num, shape, ranks, extra, dtype, group_form):
    case = make_case(7000 + num, num, *shape, ranks, dist, path, dtype, device=TEST_DEVICE, **extra)
    dev = torch.device(TEST_DEVICE)
    # the pool's facts over all its slots (not the step's tokens): which paths launch, the rank width
    batch = derive_per_token_batch(case.token_slots.to(dev, torch.int32), case.slot_families.to(dev, torch.int32),
                                   case.slot_scalings.to(dev, torch.float32), case.site.rank_width,
                                   bool((case.slot_families == TIED).any()), bool((case.slot_families >= 0).any()))
    before = case.y.to("cpu", copy=True)
    apply_triton_per_token(case.y, case.x, batch, case.site, group_form=group_form)
    after = case.y.cpu()
    rows = case.token_slots >= 0
    assert not torch.isnan(after).any()
    assert torch.equal(after[~rows], before[~rows])
    assert delta_error(before, after, case.truth) <= TOL[dtype]
