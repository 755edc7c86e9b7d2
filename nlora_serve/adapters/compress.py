"""Joint compression of many LoRAs into one shared basis plus an R×R N per adapter.

Source: Gabrielsson et al., "Compress then Serve: Serving Thousands of LoRA Adapters with Little
Overhead" (ICML 2025), the joint-diagonalization variant with a full (not diagonal) per-adapter
matrix Σᵢ. Their Σᵢ is our intermediate matrix N (DESIGN §1), so a compressed collection is served
as one family: shared A_f, B_f, one N slot per member.

Per target module, given adapters i with deltas Δᵢ = sᵢ Bᵢ Aᵢ (Aᵢ [rᵢ, in], Bᵢ [out, rᵢ]):

    minimise  Σᵢ ‖Δᵢ − B_f Nᵢ A_f‖_F²     A_f [R, in] orthonormal rows, B_f [out, R] orthonormal columns

What is implemented (never forming an out×in product; every matrix is at most [Σrᵢ, in] or
[out, Σrᵢ]):

1. For fixed orthonormal bases the least-squares Nᵢ is Nᵢ = B_fᵀ Δᵢ A_fᵀ = sᵢ (B_fᵀ Bᵢ)(Aᵢ A_fᵀ),
   and the loss equals Σ‖Δᵢ‖² − Σ‖Nᵢ‖², so the bases maximise Σ‖B_fᵀ Δᵢ A_fᵀ‖² (a Tucker-2 /
   HOSVD problem).
2. Initialisation (HOSVD): A_f = top-R right singular vectors of the stacked rows [sᵢ Rᵢ Aᵢ]ᵢ with
   RᵢᵀRᵢ = BᵢᵀBᵢ (an [rᵢ, rᵢ] square root, as the R of a QR of Bᵢ), whose Gram matrix is
   Σ Δᵢᵀ Δᵢ; B_f = top-R left singular vectors of the stacked columns [sᵢ Bᵢ Tᵢᵀ]ᵢ with
   TᵢᵀTᵢ = AᵢAᵢᵀ, whose Gram is Σ Δᵢ Δᵢᵀ.
3. Refinement (HOOI, the paper's alternating updates): A_f ← top-R right singular vectors of the
   stacked [B_fᵀ Δᵢ]ᵢ = [sᵢ (B_fᵀ Bᵢ) Aᵢ]ᵢ, then B_f ← top-R left singular vectors of
   [Δᵢ A_fᵀ]ᵢ = [sᵢ Bᵢ (Aᵢ A_fᵀ)]ᵢ. Each step cannot increase the loss.

Not implemented from the paper: clustering the collection into several families, the diagonal-Σ
variant, and per-adapter norm weighting (every adapter counts with its own ‖Δᵢ‖).

When the collection spans fewer than R directions (Σrᵢ < R, or in/out < R) the surplus basis rows
are zero, so the family keeps a uniform rank R and the padding contributes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LowRank:
    """One adapter's factors at one module: Δ = scaling · B @ A."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float  # s


@dataclass(slots=True)
class ModuleFit:
    """The compressed form of one module across the collection (float64 unless asked otherwise)."""

    A: torch.Tensor  # [R, in], orthonormal rows (zero rows past the collection's span)
    B: torch.Tensor  # [out, R], orthonormal columns (likewise)
    N: list[torch.Tensor]  # per adapter [R, R], the scaling folded in
    rel_error: list[float]  # per adapter ‖Δᵢ − B N A‖_F / ‖Δᵢ‖_F (0 for a zero Δᵢ)


def _top_right(stacked: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` right singular vectors of ``stacked`` [m, n] as rows [rank, n], zero-padded.

    Through the eigendecomposition of the smaller Gram matrix ([m, m] or [n, n]): one of the two
    sides is at most Σrᵢ or ``in``, so this is a few small eighs where an SVD of the stacked
    matrix costs much more. Eigenvalues below 1e-13 of the largest (σ below ~3e-7 σ_max: Gram
    rounding noise) are dropped and their rows left zero; the kept rows are re-orthonormalised
    (Löwdin), which repairs the rounding that the Gram route adds to weak directions.
    """
    m, n = stacked.shape
    if m < n:
        vals, vecs = torch.linalg.eigh(stacked @ stacked.T)  # ascending
        vals, vecs = vals.flip(0), vecs.flip(1)
        keep = int((vals > vals[0].clamp(min=0) * 1e-13).sum()) if vals[0] > 0 else 0
        k = min(rank, keep)
        rows = (stacked.T @ vecs[:, :k] / vals[:k].sqrt()).T  # [k, n]
    else:
        vals, vecs = torch.linalg.eigh(stacked.T @ stacked)
        vals, vecs = vals.flip(0), vecs.flip(1)
        keep = int((vals > vals[0].clamp(min=0) * 1e-13).sum()) if vals[0] > 0 else 0
        k = min(rank, keep)
        rows = vecs[:, :k].T
    if k:
        g_vals, g_vecs = torch.linalg.eigh(rows @ rows.T)
        rows = (g_vecs * g_vals.rsqrt()) @ g_vecs.T @ rows
    out = stacked.new_zeros(rank, n)
    out[:k] = rows
    return out


def _top_left(stacked: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``stacked`` [m, n] as columns [m, rank], zero-padded."""
    return _top_right(stacked.T, rank).T


def _gram_root(m: torch.Tensor) -> torch.Tensor:
    """An [r, r] matrix X with XᵀX = mᵀm for m [n, r] (symmetric square root via eigh of the small
    Gram matrix: what the R of a QR gives, without the tall QR)."""
    vals, vecs = torch.linalg.eigh(m.T @ m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def _core(items: list[LowRank], a_f: torch.Tensor, b_f: torch.Tensor) -> list[torch.Tensor]:
    """Nᵢ = sᵢ (B_fᵀ Bᵢ)(Aᵢ A_fᵀ): [R, R] each."""
    return [it.scaling * (b_f.T @ it.B) @ (it.A @ a_f.T) for it in items]


def rel_errors(items: list[LowRank], a_f: torch.Tensor, b_f: torch.Tensor, ns: list[torch.Tensor]) -> list[float]:
    """‖Δᵢ − B_f Nᵢ A_f‖_F / ‖Δᵢ‖_F per adapter, from the factors alone.

    ‖X‖² for X = [sBᵢ, −B_f Nᵢ] @ [Aᵢ; A_f] is tr((LᵀL)(RRᵀ)) with L the left and R the right
    factor: two small Gram matrices, no out×in product.
    """
    errors = []
    for it, n in zip(items, ns):
        left = torch.cat([it.scaling * it.B, -(b_f @ n)], dim=1)  # [out, r + R]
        right = torch.cat([it.A, a_f], dim=0)  # [r + R, in]
        err2 = float(((left.T @ left) * (right @ right.T)).sum().clamp(min=0))
        ref2 = float(((it.B.T @ it.B) * (it.A @ it.A.T)).sum()) * it.scaling ** 2
        errors.append((err2 / ref2) ** 0.5 if ref2 > 0 else 0.0)
    return errors


def compress_module(items: list[LowRank], rank: int, *, iters: int = 2,
                    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> ModuleFit:
    """Shared A_f [R, in], B_f [out, R] and per-adapter N [R, R] for one module (see module doc).

    Args:
        items: the adapters' factors at this module (any float dtype; ranks may differ).
        rank: R, the family rank (≥ 1).
        iters: HOOI refinement sweeps after the HOSVD initialisation (0: HOSVD only).
        dtype, device: where the arithmetic runs (float64 on the CPU by default; a GPU in float32
            is fine for large collections). Results come back in ``dtype`` on the CPU.

    Raises:
        ValueError: no items, rank < 1, or factors whose shapes disagree.
    """
    if not items or rank < 1:
        raise ValueError(f"compress_module needs at least one adapter and rank ≥ 1; got {len(items)} and {rank}")
    out, inp = items[0].B.shape[0], items[0].A.shape[1]
    for it in items:
        if it.A.shape[1] != inp or it.B.shape[0] != out or it.A.shape[0] != it.B.shape[1]:
            raise ValueError(f"factors disagree: A {tuple(it.A.shape)}, B {tuple(it.B.shape)}; "
                             f"expected A [r, {inp}] and B [{out}, r]")
    items = [LowRank(it.A.to(device, dtype), it.B.to(device, dtype), float(it.scaling)) for it in items]
    rows, cols = [], []
    for it in items:
        r_b = _gram_root(it.B)  # RᵀR = BᵢᵀBᵢ: ΔᵢᵀΔᵢ = (sRAᵢ)ᵀ(sRAᵢ)
        t_a = _gram_root(it.A.T)  # TᵀT = AᵢAᵢᵀ: ΔᵢΔᵢᵀ = (sBᵢTᵀ)(sBᵢTᵀ)ᵀ
        rows.append(it.scaling * r_b @ it.A)
        cols.append(it.scaling * it.B @ t_a.T)
    a_f = _top_right(torch.cat(rows), rank)
    b_f = _top_left(torch.cat(cols, dim=1), rank)
    for _ in range(iters):
        a_f = _top_right(torch.cat([it.scaling * (b_f.T @ it.B) @ it.A for it in items]), rank)
        b_f = _top_left(torch.cat([it.scaling * it.B @ (it.A @ a_f.T) for it in items], dim=1), rank)
    ns = _core(items, a_f, b_f)
    errors = rel_errors(items, a_f, b_f, ns)
    return ModuleFit(a_f.cpu(), b_f.cpu(), [n.cpu() for n in ns], errors)


def project_module(item: LowRank, a_f: torch.Tensor, b_f: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A new adapter onto an existing family's basis (``compress --add``): its least-squares
    N = s (B_fᵀ B)(A A_fᵀ) [R, R] (float64) and its relative error. The basis is not changed.

    Raises:
        ValueError: the factors do not fit the basis' shapes.
    """
    if item.A.shape[1] != a_f.shape[1] or item.B.shape[0] != b_f.shape[0]:
        raise ValueError(f"adapter factors A {tuple(item.A.shape)}, B {tuple(item.B.shape)} do not fit the "
                         f"family basis A_f {tuple(a_f.shape)}, B_f {tuple(b_f.shape)}")
    it = LowRank(item.A.to(torch.float64), item.B.to(torch.float64), float(item.scaling))
    a64, b64 = a_f.to(torch.float64), b_f.to(torch.float64)
    n = _core([it], a64, b64)[0]
    return n, rel_errors([it], a64, b64, [n])[0]
