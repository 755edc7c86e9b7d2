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
   [Δᵢ A_fᵀ]ᵢ = [sᵢ Bᵢ (Aᵢ A_fᵀ)]ᵢ. Each step cannot increase the loss. Each block is
   replaced by one with the same Gram matrix and min(rᵢ, R) rows (``_narrow_left``), so a
   sweep over 1,000 rank-8 LoRAs stacks 8,000 rows at any R, not 1,000·R.

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
    """A symmetric [r, r] X with XᵀX = mᵀm for m [n, r] (or a batch [b, n, r] -> [b, r, r]):
    the square root of the small Gram matrix by eigh, what the R of a QR gives without the tall QR."""
    vals, vecs = torch.linalg.eigh(m.mT @ m)
    return (vecs * vals.clamp(min=0).sqrt().unsqueeze(-2)) @ vecs.mT


def _narrow_left(m: torch.Tensor) -> torch.Tensor:
    """``m`` [b, R, r] itself when R ≤ r, else [b, r, r] X with XᵀX = mᵀm: the stacked rows
    [X Aᵢ] then have the same Gram matrix (so the same singular vectors and values) as [m Aᵢ]
    with r rows instead of R, which keeps a HOOI sweep's cost at Σrᵢ rows for any R."""
    return m if m.shape[-2] <= m.shape[-1] else _gram_root(m)


def _stack(items: list[LowRank], device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The items as one batch: A [n, r, in], B [n, out, r], s [n, 1, 1] with r = the widest rank;
    a narrower adapter's extra rows of A and columns of B are zero (its Δ is unchanged)."""
    r = max(it.A.shape[0] for it in items)
    a = torch.zeros(len(items), r, items[0].A.shape[1], device=device, dtype=dtype)
    b = torch.zeros(len(items), items[0].B.shape[0], r, device=device, dtype=dtype)
    for i, it in enumerate(items):
        a[i, : it.A.shape[0]] = it.A
        b[i, :, : it.B.shape[1]] = it.B
    s = torch.tensor([float(it.scaling) for it in items], device=device, dtype=dtype).view(-1, 1, 1)
    return a, b, s


def _core(a, b, s, a_f: torch.Tensor, b_f: torch.Tensor) -> torch.Tensor:
    """Nᵢ = sᵢ (B_fᵀ Bᵢ)(Aᵢ A_fᵀ): [n, R, R]."""
    return s * (b_f.T @ b) @ (a @ a_f.T)


def _errors(a, b, s, a_f, b_f, ns) -> list[float]:
    """‖Δᵢ − B_f Nᵢ A_f‖_F / ‖Δᵢ‖_F for a stacked batch, expanding ‖sBA − B_f N A_f‖² into traces
    of small Gram matrices: s²⟨BᵀB, AAᵀ⟩ − 2s⟨BᵀB_f N, AA_fᵀ⟩ + ⟨NᵀB_fᵀB_f N, A_f A_fᵀ⟩."""
    sv = s.view(-1)
    ref2 = sv ** 2 * ((b.mT @ b) * (a @ a.mT)).sum((-2, -1))
    cross = ((b.mT @ b_f @ ns) * (a @ a_f.T)).sum((-2, -1))
    fam = ((ns.mT @ (b_f.T @ b_f) @ ns) * (a_f @ a_f.T)).sum((-2, -1))
    err2 = (ref2 - 2 * sv * cross + fam).clamp(min=0)
    return [float((e / r) ** 0.5) if r > 0 else 0.0 for e, r in zip(err2.tolist(), ref2.tolist())]


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
    a, b, s = _stack(items, device, dtype)  # every per-adapter step below is one batched op

    def stacked_cols(c):  # [n, out, k] -> [out, n·k], adapter by adapter
        return c.permute(1, 0, 2).reshape(out, -1)

    # HOSVD: RᵀR = BᵢᵀBᵢ gives ΔᵢᵀΔᵢ = (sRAᵢ)ᵀ(sRAᵢ); TᵀT = AᵢAᵢᵀ gives ΔᵢΔᵢᵀ = (sBᵢTᵀ)(sBᵢTᵀ)ᵀ
    a_f = _top_right((s * _gram_root(b) @ a).reshape(-1, inp), rank)
    b_f = _top_left(stacked_cols(s * b @ _gram_root(a.mT).mT), rank)
    for _ in range(iters):
        a_f = _top_right((_narrow_left(s * (b_f.T @ b)) @ a).reshape(-1, inp), rank)
        b_f = _top_left(stacked_cols(b @ _narrow_left((s * (a @ a_f.T)).mT).mT), rank)
    ns = _core(a, b, s, a_f, b_f)
    errors = _errors(a, b, s, a_f, b_f, ns)
    return ModuleFit(a_f.cpu(), b_f.cpu(), list(ns.cpu().unbind(0)), errors)


def project_module(item: LowRank, a_f: torch.Tensor, b_f: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A new adapter onto an existing family's basis (``compress --add``): its least-squares
    N = s (B_fᵀ B)(A A_fᵀ) [R, R] (float64) and its relative error. The basis is not changed.

    Raises:
        ValueError: the factors do not fit the basis' shapes.
    """
    if item.A.shape[1] != a_f.shape[1] or item.B.shape[0] != b_f.shape[0]:
        raise ValueError(f"adapter factors A {tuple(item.A.shape)}, B {tuple(item.B.shape)} do not fit the "
                         f"family basis A_f {tuple(a_f.shape)}, B_f {tuple(b_f.shape)}")
    a64, b64 = a_f.to(torch.float64), b_f.to(torch.float64)
    a, b, s = _stack([item], "cpu", torch.float64)
    ns = _core(a, b, s, a64, b64)
    return ns[0], _errors(a, b, s, a64, b64, ns)[0]
