"""The adapter weights of one adapted projection ("site"), as the adapter layer hands them over."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class KernelSiteWeights:
    """Pools of one site. R = the pools' rank width (the server's max rank, or less).

    Contract shared by every path: in a slot or family that tokens use, entries beyond that slot's
    rank are zero (the engine's pools write each slot zero-padded: ``write`` in adapters/runtime/pool.py;
    ``release_slot`` clears nothing), so mixed ranks run in one launch at width R.
    Free slots/families may hold anything, NaN included: no op ever reads them.
    Any of these may be a strided view (e.g. ``n_pool = pool[:, site]`` of the [S, sites, R, R]
    tied pool, ``tied_b = W[:, :R]``); nothing is copied.
    """

    n_pool: torch.Tensor  # [S, R, R]: N (M) per slot; the engine's pools hold s · N (plain LoRA: s · I)
    a_pool: torch.Tensor | None = None  # [F, R, in]: A per family (None: no group-path slots)
    b_pool: torch.Tensor | None = None  # [F, out, R]: B per family
    tied_b: torch.Tensor | None = None  # [out, R']: W[:, :R'] of the base weight, R' ≥ R used
    # [R', in]: W[:R'] (the base weight's first R' rows at this module's offset), a view; the fused
    # tied form recomputes z = x · W[:R]ᵀ from it instead of reading y[:, :R] (triton_path.py)
    tied_a: torch.Tensor | None = None
    tied_bias: torch.Tensor | None = None  # [R'']: bias[:R''] of the base layer (Qwen2 q/k/v)
    # [R', out] contiguous: W[:, :R']^T, an optional copy of tied_b's transpose that the owner
    # keeps (r · out elements per site). The CPU expand reads it instead of the strided view,
    # which saves MKL/oneDNN a packing pass per call; values must equal tied_b's exactly.
    tied_bt: torch.Tensor | None = None
    # [F, R, out], rows contiguous: B^T per family, an optional copy the owner keeps on the CPU
    # (the LoRA pool writes it with each slot). The native group op reads it instead of
    # transposing every used family's B on every call; values must equal b_pool's exactly.
    b_pool_t: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.n_pool
        if n.dim() != 3 or n.shape[1] != n.shape[2]:
            raise ValueError(f"n_pool must be [S, R, R], got {tuple(n.shape)}")
        if (self.a_pool is None) != (self.b_pool is None):
            raise ValueError("a_pool and b_pool come together (both or neither)")
        if self.a_pool is not None:
            a, b = self.a_pool, self.b_pool
            if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
                raise ValueError(f"a_pool [F, R, in] / b_pool [F, out, R] disagree: "
                                 f"{tuple(a.shape)} vs {tuple(b.shape)}")
            if a.shape[1] < n.shape[1] or b.shape[2] < n.shape[1]:
                raise ValueError(f"a_pool/b_pool rank width {a.shape[1]}/{b.shape[2]} is below "
                                 f"n_pool's {n.shape[1]}")
        if self.tied_b is not None and self.tied_b.dim() != 2:
            raise ValueError(f"tied_b must be [out, R'], got {tuple(self.tied_b.shape)}")
        if self.tied_a is not None and self.tied_a.dim() != 2:
            raise ValueError(f"tied_a must be [R', in], got {tuple(self.tied_a.shape)}")
        bpt = self.b_pool_t
        if bpt is not None and (self.b_pool is None or bpt.shape != (self.b_pool.shape[0], self.b_pool.shape[2],
                                                                     self.b_pool.shape[1]) or bpt.stride(2) != 1):
            raise ValueError(f"b_pool_t must be b_pool's per-family transpose [F, R, out] with unit stride "
                             f"along out; got {tuple(bpt.shape)} for b_pool "
                             f"{None if self.b_pool is None else tuple(self.b_pool.shape)}")
        bt = self.tied_bt
        if bt is not None and (self.tied_b is None or bt.shape != self.tied_b.shape[::-1]
                               or not bt.is_contiguous()):
            raise ValueError(f"tied_bt must be tied_b's transpose, contiguous [R', out]; got "
                             f"{tuple(bt.shape)} for tied_b "
                             f"{None if self.tied_b is None else tuple(self.tied_b.shape)}")

    @property
    def rank_width(self) -> int:
        """R: the widest rank these pools can hold."""
        return self.n_pool.shape[1]

    @property
    def dtypes(self) -> set[torch.dtype]:
        """Dtypes of every tensor present (the ops require one compute dtype)."""
        ts = (self.n_pool, self.a_pool, self.b_pool, self.tied_b, self.tied_a, self.tied_bias,
              self.tied_bt, self.b_pool_t)
        return {t.dtype for t in ts if t is not None}
