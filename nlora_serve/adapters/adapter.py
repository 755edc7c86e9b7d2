"""The typed in-memory adapter every other part of the engine consumes.

Maths (DESIGN §1, NLoRA arXiv 2502.14482): for a projection with weight W [out, in] and token x [in],

    y = W x + s · (B (N (A x)) + b)        A [r, in], N [r, r], B [out, r], b [out] (optional)

N is the intermediate matrix N (M); plain LoRA stores no N and gets N = I.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from nlora_serve.adapters.config import AdapterConfig
from nlora_serve.models.spec import PROJECTIONS

FLAVOURS = ("lora", "nlora", "inttune-tied", "family")


@dataclass(slots=True)
class SiteWeights:
    """One adapted projection. Tensors are in the adapter's compute dtype.

    For a tied adapter ``A`` and ``B`` are views into the base weight (``W[:r, :]`` and
    ``W[:, :r]``), so they cost no memory of their own: only ``N`` (and ``bias``) is per tenant.
    """

    layer: int
    module: str  # one of PROJECTIONS
    rank: int  # r
    scaling: float  # s (config.lora_scaling)
    A: torch.Tensor  # [r, in]
    N: torch.Tensor  # [r, r]; identity for plain LoRA
    B: torch.Tensor  # [out, r]
    bias: torch.Tensor | None = None  # [out], lora_B's bias (lora_bias=true)
    has_n: bool = True  # False when the file held no lora_N (plain LoRA; N is the identity)

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``s · B @ N @ A`` as one [out, in] matrix in ``dtype`` (computed in float64)."""
        a, n, b = (t.to(torch.float64) for t in (self.A, self.N, self.B))
        return (self.scaling * (b @ (n @ a))).to(dtype)

    def bias_delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        """``s · b`` [out] in ``dtype``, or None without a bias."""
        return None if self.bias is None else (self.scaling * self.bias.to(torch.float64)).to(dtype)


@dataclass(slots=True)
class Adapter:
    """A validated adapter, ready to serve.

    ``sites`` is ordered by layer, then PROJECTIONS order. ``content_hash`` is the sha256 of the
    maths (see :func:`content_hash`): equal hashes mean equal outputs, whatever the file layout.
    """

    config: AdapterConfig
    sites: dict[tuple[int, str], SiteWeights]
    flavour: str  # one of FLAVOURS
    dtype: torch.dtype  # compute dtype of every tensor
    stored_dtype: torch.dtype  # dtype the tensors had on disk (float16 / bfloat16 / float32)
    content_hash: str  # 64 hex chars
    family_key: str | None = None  # tied adapters only: tied.family_key
    shared_family: str | None = None  # compressed family members only: family.factors_key
    # compressed family members only: the family.FamilyFactors whose cast factors A and B are (held
    # once per family by the manager's FamilyResolver while admitted versions use it)
    family_factors: object | None = field(default=None, repr=False, compare=False)
    base_fingerprint: str = ""  # the base model the adapter was validated against
    source: str = field(default="", repr=False)  # where it was read from, for messages
    # [sites] float64, per site the most s·‖N‖∞ its A, B and bias allow (adapters/bounds.py): what
    # a hot-swap of N alone is checked against. Set by loader.assemble_adapter.
    n_limits: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_tied(self) -> bool:
        """A = W[:r, :] and B = W[:, :r] of the base weight at every site (DESIGN §1)."""
        return self.family_key is not None

    @property
    def ranks(self) -> list[int]:
        """Distinct ranks, ascending."""
        return sorted({s.rank for s in self.sites.values()})

    @property
    def targets(self) -> list[str]:
        """Adapted projection names, in PROJECTIONS order."""
        present = {m for _, m in self.sites}
        return [m for m in PROJECTIONS if m in present]

    @property
    def layers(self) -> list[int]:
        """Adapted layer indices, ascending."""
        return sorted({layer for layer, _ in self.sites})

    def held_bytes(self) -> int:
        """Bytes this adapter owns in memory: N (+ bias) for a tied adapter or a family member (the
        family's A, B are held once), A, N, B (+ bias) else.

        Plain LoRA's identity N is not counted: the engine need not materialise it.
        """
        total = 0
        for s in self.sites.values():
            shared = self.is_tied or self.shared_family is not None  # A, B held once elsewhere
            owned = [s.N if s.has_n else None, s.bias] + ([] if shared else [s.A, s.B])
            total += sum(t.numel() * t.element_size() for t in owned if t is not None)
        return total

    def full_bytes(self) -> int:
        """Bytes of A, N, B (+ bias) at every site, as an untied copy would hold them."""
        return sum(sum(t.numel() * t.element_size() for t in (s.A, s.N if s.has_n else None, s.B, s.bias)
                       if t is not None) for s in self.sites.values())


def sort_sites(sites: dict[tuple[int, str], SiteWeights]) -> dict[tuple[int, str], SiteWeights]:
    """``sites`` re-ordered by (layer, PROJECTIONS index)."""
    return dict(sorted(sites.items(), key=lambda kv: (kv[0][0], PROJECTIONS.index(kv[0][1]))))


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """float32 values in C order as a buffer: no copy (and no tensor op) for a contiguous float32
    tensor, which is what the hot-swap path hashes."""
    if t.dtype != torch.float32 or t.requires_grad:
        t = t.detach().to(torch.float32)
    return np.ascontiguousarray(t.numpy())


def content_hash(sites: dict[tuple[int, str], SiteWeights], family_key: str | None) -> str:
    """sha256 over the maths: per site (in order) layer, module, rank, scaling and the float32
    bytes of N and bias, plus A and B for an untied adapter (a tied one hashes its family key
    instead, so the full and compact forms of one tenant hash alike). N = I is hashed as the
    identity, so a LoRA and its LoRA → NLoRA conversion share a hash. Returns 64 hex chars.
    """
    h = hashlib.sha256(f"nlora-adapter-v1|family={family_key}\n".encode())
    for (layer, module), s in sort_sites(sites).items():
        h.update(f"{layer}|{module}|r={s.rank}|s={float(s.scaling)!r}|bias={s.bias is not None}\n".encode())
        for t in ((s.N, s.bias) if family_key else (s.A, s.N, s.B, s.bias)):
            if t is not None:
                h.update(_tensor_bytes(t))
    return h.hexdigest()


def flavour_of(sites: dict[tuple[int, str], SiteWeights], tied: bool) -> str:
    """``inttune-tied`` when tied, ``nlora`` when any site has an N, else ``lora``."""
    if tied:
        return "inttune-tied"
    return "nlora" if any(s.has_n for s in sites.values()) else "lora"
