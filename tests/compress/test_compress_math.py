"""The compression maths against float64 references built by hand (dense Δ only in the tests)."""

from __future__ import annotations

import pytest
import torch

from nlora_serve.adapters.compress.basis import LowRank, compress_module, project_module


def _orth(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q  # [rows, cols] orthonormal columns


def _shared_basis_loras(n: int, r: int, big_r: int, out: int, inp: int, gen) -> list[LowRank]:
    """LoRAs whose deltas lie in one common [out, R] x [R, in] basis (random mixes inside it)."""
    u, v = _orth(out, big_r, gen), _orth(inp, big_r, gen)
    items = []
    for _ in range(n):
        items.append(LowRank(A=torch.randn(r, big_r, generator=gen, dtype=torch.float64) @ v.T,
                             B=u @ torch.randn(big_r, r, generator=gen, dtype=torch.float64),
                             scaling=float(torch.rand((), generator=gen)) + 0.5))
    return items


def _dense_error(it: LowRank, fit, i: int) -> float:
    ref = it.scaling * it.B.double() @ it.A.double()
    got = fit.B @ fit.N[i] @ fit.A
    return float(torch.linalg.norm(ref - got) / torch.linalg.norm(ref))


def test_exact_recovery_from_common_basis():
    gen = torch.Generator().manual_seed(0)
    items = _shared_basis_loras(6, 4, 12, 96, 80, gen)
    fit = compress_module(items, 12)
    for i, it in enumerate(items):
        assert _dense_error(it, fit, i) < 1e-12
        assert fit.rel_error[i] < 1e-6  # from the factors: sqrt of a difference of squares
    assert torch.allclose(fit.A @ fit.A.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(fit.B.T @ fit.B, torch.eye(12, dtype=torch.float64), atol=1e-12)


def test_factor_error_matches_dense_and_decreases_with_rank():
    gen = torch.Generator().manual_seed(1)
    items = [LowRank(torch.randn(8, 64, generator=gen), torch.randn(72, 8, generator=gen), 2.0) for _ in range(5)]
    totals = []
    for rank in (4, 8, 16, 32, 40):
        fit = compress_module(items, rank)
        dense = [_dense_error(it, fit, i) for i, it in enumerate(items)]
        assert fit.rel_error == pytest.approx(dense, abs=1e-7)
        totals.append(sum(e ** 2 * float(torch.linalg.norm(it.scaling * it.B.double() @ it.A.double())) ** 2
                          for e, it in zip(dense, items)))
    assert all(b < a for a, b in zip(totals, totals[1:]))
    assert totals[-1] < 1e-20  # R = Σr = 40 spans everything


def test_n_is_least_squares_for_the_basis():
    """For fixed orthonormal bases N = B_fᵀ Δ A_fᵀ; any perturbation of N raises the error."""
    gen = torch.Generator().manual_seed(2)
    items = [LowRank(torch.randn(4, 30, generator=gen), torch.randn(20, 4, generator=gen), 0.5) for _ in range(3)]
    fit = compress_module(items, 6)
    ref = items[0].scaling * items[0].B.double() @ items[0].A.double()
    assert torch.allclose(fit.N[0], fit.B.T @ ref @ fit.A.T, atol=1e-12)
    base = torch.linalg.norm(ref - fit.B @ fit.N[0] @ fit.A)
    bumped = fit.N[0] + 1e-3 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    assert torch.linalg.norm(ref - fit.B @ bumped @ fit.A) > base


def test_refinement_never_hurts():
    gen = torch.Generator().manual_seed(3)
    items = [LowRank(torch.randn(8, 48, generator=gen), torch.randn(56, 8, generator=gen), 1.0) for _ in range(6)]
    loss = []
    for iters in (0, 1, 3):
        fit = compress_module(items, 12, iters=iters)
        loss.append(sum(_dense_error(it, fit, i) ** 2 * float(torch.linalg.norm(it.B.double() @ it.A.double())) ** 2
                        for i, it in enumerate(items)))
    assert loss[1] <= loss[0] * (1 + 1e-9) and loss[2] <= loss[1] * (1 + 1e-9)


def test_project_onto_basis():
    gen = torch.Generator().manual_seed(4)
    items = _shared_basis_loras(4, 3, 8, 40, 36, gen)
    fit = compress_module(items[:3], 8)
    n, err = project_module(items[3], fit.A, fit.B)  # inside the basis: exact
    ref = items[3].scaling * items[3].B @ items[3].A
    assert err < 1e-6 and torch.allclose(fit.B @ n @ fit.A, ref, atol=1e-10)
    outside = LowRank(torch.randn(3, 36, generator=gen), torch.randn(40, 3, generator=gen), 1.0)
    assert project_module(outside, fit.A, fit.B)[1] > 0.3


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="at least one adapter"):
        compress_module([], 4)
    with pytest.raises(ValueError, match="factors disagree"):
        compress_module([LowRank(torch.ones(2, 5), torch.ones(4, 2), 1.0),
                         LowRank(torch.ones(2, 6), torch.ones(4, 2), 1.0)], 2)
