"""The float64 reference composition against the per-token truth; dispatch's refusals."""

import pytest
import torch

from kernel_cases import TOL, delta_error, make_case
from nlora_serve.kernels import KernelSiteWeights, apply_adapters
from nlora_serve.kernels.reference import apply_reference


@pytest.mark.parametrize("path", ("tied", "own", "shared", "mixed"))
@pytest.mark.parametrize("dist", ("distinct", "one", "with_none"))
def test_reference_is_exact_in_float64(dist, path):
    case = make_case(8000 + len(dist) + len(path), 23, 577, 131, (1, 7, 16), dist, path,
                     torch.float64, bias=path == "tied", fused=True)
    before = case.y.clone()
    apply_reference(case.y, case.x, case.batch(), case.site)
    assert not torch.isnan(case.y).any()
    assert delta_error(before, case.y, case.truth) <= TOL[torch.float64]


def case16():
    return make_case(8100, 9, 576, 192, (16,), "distinct", "mixed", torch.float32)


def test_dtype_mismatch_is_refused():
    case = case16()
    with pytest.raises(TypeError, match="one compute dtype"):
        apply_adapters(case.y, case.x.bfloat16(), case.batch(), case.site)


def test_token_count_mismatch_is_refused():
    case = case16()
    with pytest.raises(ValueError, match="T = 9"):
        apply_adapters(case.y[:8], case.x[:8], case.batch(), case.site)


def test_missing_tied_weight_is_refused():
    case = make_case(8200, 9, 576, 192, (16,), "distinct", "tied", torch.float32)
    site = KernelSiteWeights(n_pool=case.site.n_pool)
    with pytest.raises(ValueError, match="tied tokens need tied_b"):
        apply_adapters(case.y, case.x, case.batch(), site)


def test_rank_beyond_pool_width_is_refused():
    case = case16()
    narrow = KernelSiteWeights(case.site.n_pool[:, :8, :8], case.site.a_pool, case.site.b_pool,
                         case.site.tied_b)
    with pytest.raises(ValueError, match="exceeds the pools' width"):
        apply_adapters(case.y, case.x, case.batch(), narrow)


def test_malformed_pools_are_refused():
    with pytest.raises(ValueError, match=r"n_pool must be \[S, R, R\]"):
        KernelSiteWeights(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="both or neither"):
        KernelSiteWeights(torch.zeros(2, 4, 4), a_pool=torch.zeros(1, 4, 8))
    w = torch.zeros(10, 6)
    for bad in (w[:, :4].t().contiguous(), w[:, :5].contiguous(), w[:, :5].t()):
        with pytest.raises(ValueError, match="tied_bt must be tied_b's transpose"):
            KernelSiteWeights(torch.zeros(2, 4, 4), tied_b=w[:, :5], tied_bt=bad)
