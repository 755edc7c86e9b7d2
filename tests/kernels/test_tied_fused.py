"""The one-launch tied op (kernels/triton_ops/tied_fused.py) under TRITON_INTERPRET=1 against the float64 truth
(s · W[:, :r] · N · W[:r] x per token, computed from the raw matrices in kernel_cases.py): bf16 and
fp32, ranks 1…128 and mixed ranks in one launch, slot −1 rows untouched bit for bit, NaN-filled
free slots, and composed with group-path tokens through apply_triton_per_token(tied_form="fused")."""

import pytest
import torch

from kernel_cases import TEST_DEVICE, TOL, delta_error, make_case
from nlora_serve.kernels.triton_ops.per_token_batch import derive_per_token_batch
from nlora_serve.kernels.metadata import TIED
from nlora_serve.kernels.triton_ops.tied_fused import fused_config, tied_fused
from nlora_serve.kernels.triton_ops.triton_path import apply_triton, apply_triton_per_token

DTYPES = (torch.float32, torch.bfloat16)


def _per_token_batch(case, dev):
    return derive_per_token_batch(case.token_slots.to(dev, torch.int32), case.slot_families.to(dev, torch.int32),
                                  case.slot_scalings.to(dev, torch.float32), case.site.rank_width,
                                  bool((case.slot_families == TIED).any()), bool((case.slot_families >= 0).any()))


def _check(case, before, dtype):
    after = case.y.cpu()
    rows = case.token_slots >= 0
    assert not torch.isnan(after).any()
    assert torch.equal(after[~rows], before[~rows])  # slot −1: not a bit changed
    assert delta_error(before, after, case.truth) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num,shape,ranks,dist,extra", (
    (19, (577, 131), (1,), "distinct", {}),
    (17, (64, 96), (16, 3), "with_none", {"fused": True, "width": 32}),
    (5, (130, 150), (128, 7), "skewed", {}),
    (23, (96, 80), (64,), "zipf", {"bias": True}),
))
def test_tied_fused_against_truth(num, shape, ranks, dist, extra, dtype):
    case = make_case(8000 + num, num, *shape, ranks, dist, "tied", dtype, device=TEST_DEVICE, **extra)
    b = _per_token_batch(case, torch.device(TEST_DEVICE))
    before = case.y.to("cpu", copy=True)
    s = case.site
    tied_fused(case.x, s.tied_a, s.tied_b, s.n_pool, b.tok_tied_slot, case.y, b.rank, b.slot_scalings)
    _check(case, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", (1, 16, 64))
def test_tied_fused_z_from_extra_gemm_columns(rank, dtype):
    # z handed over as R extra columns of the base GEMM's output (weight rows W[:R] appended), so
    # nothing is recomputed: the same delta as the truth, y's own columns never read for z
    case = make_case(8300 + rank, 21, 96, 80, (rank,), "with_none", "tied", dtype, device=TEST_DEVICE)
    b = _per_token_batch(case, torch.device(TEST_DEVICE))
    s = case.site
    y_ext = torch.full((21, 80 + rank), float("nan"), dtype=dtype, device=case.x.device)
    y_ext[:, 80:] = (case.x.double() @ s.tied_a[:rank].double().t()).to(dtype)  # GEMM's extra columns
    z = y_ext[:, 80:]
    before = case.y.to("cpu", copy=True)
    tied_fused(case.x, None, s.tied_b, s.n_pool, b.tok_tied_slot, case.y, rank, b.slot_scalings, z=z)
    _check(case, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", ("with_none", "skewed"))
def test_per_token_path_fused_form_with_group_tokens(dist, dtype):
    # tied, own-family and shared-family tenants in one step: the fused tied launch and the group
    # path's shrink/expand add into disjoint rows of the same y
    case = make_case(8100, 31, 96, 80, (16, 5), dist, "mixed", dtype, device=TEST_DEVICE, fused=True)
    b = _per_token_batch(case, torch.device(TEST_DEVICE))
    assert b.has_tied and b.has_group
    before = case.y.to("cpu", copy=True)
    apply_triton_per_token(case.y, case.x, b, case.site, tied_form="fused")
    _check(case, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_form_fused_with_group_segments(dtype):
    # apply_triton (sorted runs, SGMV for the group path) with the tied path in its fused form:
    # one tenant per long run, as a prefill chunk lays them out, tied and group runs mixed
    case = make_case(8150, 41, 80, 72, (16, 4), "skewed", "mixed", dtype, device=TEST_DEVICE)
    b = case.batch(device=TEST_DEVICE)
    assert b.num_tied and b.num_group
    before = case.y.to("cpu", copy=True)
    apply_triton(case.y, case.x, b, case.site, tied_form="fused")
    _check(case, before, dtype)


def test_fused_grid_depends_on_shape_only():
    # decode: many column programs (occupancy); prefill: one per token block (z computed once)
    dev = torch.device("cpu")
    small, large = fused_config(64, 4096, 16, dev), fused_config(16384, 4096, 16, dev)
    assert small["N_TILES"] == 1
    assert large["N_TILES"] == 4096 // large["BLOCK_N"]


def test_refuses_bad_input():
    case = make_case(8200, 4, 32, 24, (4,), "one", "tied", torch.float32)
    b = _per_token_batch(case, torch.device("cpu"))
    s = case.site
    with pytest.raises(ValueError, match="tied_a"):
        tied_fused(case.x, s.tied_a[:, :5], s.tied_b, s.n_pool, b.tok_tied_slot, case.y, 4)
    with pytest.raises(ValueError, match="tied_a .* or z"):
        tied_fused(case.x, None, s.tied_b, s.n_pool, b.tok_tied_slot, case.y, 4)
    with pytest.raises(ValueError, match="z "):
        tied_fused(case.x, None, s.tied_b, s.n_pool, b.tok_tied_slot, case.y, 4, z=case.x[:, :3])
    with pytest.raises(ValueError, match="rank"):
        tied_fused(case.x, s.tied_a, s.tied_b, s.n_pool, b.tok_tied_slot, case.y, 0)
    with pytest.raises(TypeError, match="y must be"):
        tied_fused(case.x, s.tied_a, s.tied_b, s.n_pool, b.tok_tied_slot, case.y.double(), 4)
    with pytest.raises(ValueError, match="tied_form"):
        apply_triton_per_token(case.y, case.x, b, s, tied_form="one_launch")
    s.tied_a = None
    with pytest.raises(ValueError, match="tied_a"):
        apply_triton_per_token(case.y, case.x, b, s, tied_form="fused")
