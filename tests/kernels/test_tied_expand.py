"""The tiled tied expand (kernels/triton_ops/tied_expand.py) under TRITON_INTERPRET=1 against a float64 truth:
y[t] += s[slot] · W[:, :R] · u[t] computed per token from the raw tensors, bf16 and fp32, ranks 1,
16, 64, 128 (and 200: two K steps), token counts and widths that are not multiples of the tiles,
slot −1 rows untouched bit for bit, mixed tenants with different scalings, a column view of a
fused output, NaN in W's columns beyond R; then composed as apply_triton_per_token / apply_triton
with tied_form="tiled" against the s · W[:, :r] N W[:r] x truth of kernel_cases.py."""

import pytest
import torch

from kernel_cases import TEST_DEVICE, TOL, delta_error, make_case
from nlora_serve.kernels.triton_ops.config import get_config
from nlora_serve.kernels.triton_ops.per_token_batch import derive_per_token_batch
from nlora_serve.kernels.metadata import TIED
from nlora_serve.kernels.triton_ops.tied_expand import tied_expand
from nlora_serve.kernels.triton_ops.triton_path import apply_triton, apply_triton_per_token

DTYPES = (torch.float32, torch.bfloat16)


def _operands(seed, num, out, rank, dtype):
    """(u [T, R] fp32, W [out, R + 5] with NaN beyond R, slots [T] int32 with −1s, scalings [S],
    y [T, out] as a column view of a wider fused output, that output), on TEST_DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(num, rank, generator=gen)
    # |delta| ≈ 2–6 against |y| ≈ 0.5: bf16 rounding of y itself must not dominate the measured error
    w = torch.randn(out, rank + 5, generator=gen, dtype=torch.float64) * 2 * rank ** -0.5
    w[:, rank:] = float("nan")  # a read past R would poison every row it touches
    slots = torch.randint(0, 6, (num,), generator=gen, dtype=torch.int32)
    slots[torch.rand(num, generator=gen) < 0.3] = -1
    scal = torch.rand(6, generator=gen) * 2 + 1  # six tenants, six scalings
    wide = (torch.randn(num, out + 29, generator=gen) * 0.5).to(dtype)  # like gate_up: y at columns 13…
    wide[slots < 0, 13:] = -0.0  # a skipped row rewritten as y + 0 would turn into +0.0
    dev = lambda t: t.to(TEST_DEVICE)  # noqa: E731
    wide = dev(wide)
    return dev(u), dev(w.to(dtype)), dev(slots), dev(scal), wide[:, 13:13 + out], wide


def _truth(u, w, slots, scal, rank):
    """[T, out] float64: s[slot] · W[:, :R] · u[t] per token with slot ≥ 0, else 0."""
    truth = torch.zeros(u.shape[0], w.shape[0], dtype=torch.float64)
    w64 = w.cpu().double()[:, :rank]
    for t in range(u.shape[0]):
        slot = int(slots[t])
        if slot >= 0:
            truth[t] = float(scal[slot]) * (w64 @ u[t].cpu().double())
    return truth


def _bits(t):
    return t.cpu().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num,out,rank", ((1, 150, 16), (17, 577, 1), (64, 131, 64), (17, 96, 128), (5, 70, 200)))
def test_tied_expand_against_truth(num, out, rank, dtype):
    u, w, slots, scal, y, wide = _operands(9000 + num + rank, num, out, rank, dtype)
    before = wide.to("cpu", copy=True)
    tied_expand(u, w, slots, y, scal)
    rows = (slots >= 0).cpu()
    after = wide.cpu()
    assert not torch.isnan(after).any()
    assert torch.equal(_bits(after[~rows]), _bits(before[~rows]))  # slot −1: not a bit changed
    assert torch.equal(_bits(after[:, :13]), _bits(before[:, :13]))  # the fused output's other columns
    assert torch.equal(_bits(after[:, 13 + out:]), _bits(before[:, 13 + out:]))
    span = slice(13, 13 + out)
    assert delta_error(before[:, span], after[:, span], _truth(u, w, slots, scal.cpu(), rank)) <= TOL[dtype]


def test_scalings_none_means_one_and_no_tied_token_changes_nothing():
    u, w, slots, _, y, _ = _operands(9100, 19, 90, 16, torch.float32)
    before = y.to("cpu", copy=True)
    tied_expand(u, w, slots, y)
    assert delta_error(before, y.cpu(), _truth(u, w, slots.cpu(), torch.ones(6), 16)) <= TOL[torch.float32]
    snap = y.to("cpu", copy=True)
    tied_expand(torch.full_like(u, float("nan")), w, torch.full_like(slots, -1), y)
    assert torch.equal(y.cpu(), snap)


def test_config_pads_rank_to_a_dot_and_caps_it():
    assert get_config("tied_expand", 1)["BLOCK_R"] == 16  # tl.dot needs K ≥ 16
    assert get_config("tied_expand", 100)["BLOCK_R"] == 128
    assert get_config("tied_expand.fp32", 256)["BLOCK_R"] == 128  # rank 256: two K steps
    assert get_config("tied_expand", 16)["BLOCK_T"] >= 16  # tl.dot needs M ≥ 16


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
@pytest.mark.parametrize("num,shape,ranks,dist,path,extra", (
    (23, (96, 80), (16, 3), "with_none", "tied", {"bias": True, "fused": True}),
    (31, (96, 80), (16, 5), "skewed", "mixed", {}),
))
def test_per_token_path_tiled_form(num, shape, ranks, dist, path, extra, dtype):
    # mix (z read from y) then the tiled expand; group tokens in the same step add into other rows
    case = make_case(9200 + num, num, *shape, ranks, dist, path, dtype, device=TEST_DEVICE, **extra)
    b = _per_token_batch(case, torch.device(TEST_DEVICE))
    assert b.has_tied
    before = case.y.to("cpu", copy=True)
    apply_triton_per_token(case.y, case.x, b, case.site, tied_form="tiled")
    _check(case, before, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_form_tiled_with_group_segments(dtype):
    # sorted runs (apply_triton): eleven tied runs of one to three tokens, one tiled launch over all
    case = make_case(9251, 41, 80, 72, (16, 4), "distinct", "mixed", dtype, device=TEST_DEVICE)
    b = case.batch(device=TEST_DEVICE)
    assert b.num_tied and b.num_group
    before = case.y.to("cpu", copy=True)
    apply_triton(case.y, case.x, b, case.site, tied_form="tiled")
    _check(case, before, dtype)


def test_refuses_bad_input():
    u, w, slots, scal, y, _ = _operands(9300, 4, 24, 4, torch.float32)
    with pytest.raises(TypeError, match="y must be"):
        tied_expand(u, w, slots, y.double())
    with pytest.raises(ValueError, match="tied_b"):
        tied_expand(u, w[:, :3], slots, y)
    with pytest.raises(ValueError, match="tied_b"):
        tied_expand(u, w[None], slots, y)
    with pytest.raises(ValueError, match="u must be"):
        tied_expand(u[:3], w, slots, y)
    with pytest.raises(ValueError, match="tok_slot has"):
        tied_expand(u, w, slots[:3], y)
    with pytest.raises(TypeError, match="tok_slot"):
        tied_expand(u, w, slots.float(), y)
    with pytest.raises(TypeError, match="slot_scalings"):
        tied_expand(u, w, slots, y, scal.double())
    with pytest.raises(ValueError, match="rank column"):
        tied_expand(u[:, :0], w, slots, y)
