"""The CPU torch path (what the engine runs) against the per-token float64 truth."""

import pytest
import torch

from kernel_cases import DISTS, PATHS, TOL, delta_error, make_case
from nlora_serve.kernels import apply_adapters

DTYPES = (torch.float32, torch.bfloat16)
# Default-model projection shapes (in, out) plus odd ones.
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (577, 131))


def run_case(case):
    before = case.y.clone()
    out = apply_adapters(case.y, case.x, case.batch(), case.site)
    assert out is case.y
    assert not torch.isnan(case.y).any(), "a NaN from a free slot leaked"
    untouched = case.token_slots < 0
    assert torch.equal(case.y[untouched], before[untouched]), "a slot −1 row changed"
    return delta_error(before, case.y, case.truth)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dist", DISTS)
def test_paths_and_popularity(dist, path, dtype):
    case = make_case(1000 + DISTS.index(dist) * 10 + PATHS.index(path), 61, 576, 576, (16,),
                     dist, path, dtype)
    assert run_case(case) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ranks", ((1,), (7,), (16,), (64,), (128,), (1, 7, 16, 64)), ids=str)
def test_ranks_and_sizes(ranks, shape, dtype):
    seed = 2000 + SHAPES.index(shape) * 10 + len(ranks) * 100 + ranks[0]
    case = make_case(seed, 37, *shape, ranks, "zipf", "mixed", dtype)
    assert run_case(case) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens", (1, 2, 13, 64, 257))
@pytest.mark.parametrize("dist", ("distinct", "with_none"))
def test_token_counts(num_tokens, dist, dtype):
    case = make_case(3000 + num_tokens, num_tokens, 576, 192, (16, 8), dist, "mixed", dtype,
                     num_used=min(num_tokens, 64))
    assert run_case(case) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ("tied", "mixed"))
def test_bias_and_fused_view(path, dtype):
    """Qwen2-style bias (z = y − b) and y as a column view inside a wider fused output."""
    case = make_case(4000 + PATHS.index(path), 29, 576, 192, (16, 4), "skewed", path, dtype,
                     bias=True, fused=True, width=32)
    wide = case.y._base
    assert wide is not None and not case.y.is_contiguous()
    outside = torch.cat([wide[:, :11], wide[:, 11 + case.y.shape[1]:]], 1).clone()
    assert run_case(case) <= TOL[dtype]
    after = torch.cat([wide[:, :11], wide[:, 11 + case.y.shape[1]:]], 1)
    assert after.isnan().all() and outside.isnan().all(), "wrote outside the module's columns"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_adapter_leaves_y_bitwise(dtype):
    case = make_case(5000, 16, 576, 576, (16,), "none", "mixed", dtype)
    before = case.y.clone()
    apply_adapters(case.y, case.x, case.batch(), case.site)
    assert torch.equal(case.y, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ("tied", "own", "shared"))
def test_one_adapter_fast_path(path, dtype):
    case = make_case(5100 + PATHS.index(path), 23, 576, 1536, (16,), "one", path, dtype)
    assert case.batch().single_slot >= 0
    assert run_case(case) <= TOL[dtype]


def test_float64_torch_path_is_exact():
    case = make_case(5200, 19, 577, 131, (1, 7, 16), "with_none", "mixed", torch.float64)
    assert run_case(case) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
@pytest.mark.parametrize("dist", ("distinct", "one", "with_none"))
@pytest.mark.parametrize("scaling", (1.0, 2.5), ids=str)
def test_uniform_scaling_and_contiguous_tied_bt(scaling, dist, dtype):
    """The engine's case (pools fold s into N, so s = 1) and TiedPool's contiguous tied_bt."""
    case = make_case(5300 + len(dist) + int(scaling), 41, 576, 1536, (16, 4), dist, "mixed",
                     dtype, bias=True, scaling=scaling, tied_bt=True)
    assert case.batch().uniform_scaling == scaling
    assert run_case(case) <= TOL[dtype]
