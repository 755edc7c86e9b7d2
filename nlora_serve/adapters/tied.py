"""Nyström-tied adapters: A = W[:r, :], B = W[:, :r] of the base weight (DESIGN §1, §3).

An IntTune tenant (NLoRA init, then only N tuned) keeps the base weight's own slices as A and B,
so the engine holds only N per tenant and reads A and B as views of W. Tenants that share the
base, the rank per module, the targets and the layers form one *family* (one N pool).
"""

from __future__ import annotations

import hashlib
import json

import torch

from nlora_serve.adapters.adapter import SiteWeights
from nlora_serve.models.base import BaseModel

TIED_INIT = "nystrom"  # A = W[:r, :], B = W[:, :r]; the same for the reference N and for pinv(N)


def family_key(base_fingerprint: str, ranks: dict[tuple[int, str], int]) -> str:
    """sha256 hex of (base fingerprint, init, sorted (layer, module, r) sites).

    The sites carry the targets, the layers and r per module. The init is the A/B init
    (``nystrom``); the reference and pinv N inits share A and B, so they share a family.
    """
    sites = sorted([layer, module, r] for (layer, module), r in ranks.items())
    blob = json.dumps({"base": base_fingerprint, "init": TIED_INIT, "sites": sites}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _close(x: torch.Tensor, ref: torch.Tensor, tol_dtypes: tuple[torch.dtype, ...]) -> bool:
    """|x - ref| <= eps·|ref| + eps·tiny elementwise, eps the coarsest of ``tol_dtypes``."""
    if x.shape != ref.shape:
        return False
    info = max((torch.finfo(d) for d in tol_dtypes), key=lambda f: f.eps)
    x64, r64 = x.to(torch.float64), ref.to(torch.float64)
    return bool(((x64 - r64).abs() <= info.eps * r64.abs() + info.eps * info.tiny).all())


def site_is_tied(site: SiteWeights, weight: torch.Tensor, stored_dtype: torch.dtype) -> bool:
    """Whether A == W[:r, :] and B == W[:, :r] within the rounding of the adapter's stored dtype
    (and of the base weight's dtype, if coarser).

    Args:
        site: the site as read (A [r, in], B [out, r], any float dtype).
        weight: the base weight W [out, in].
        stored_dtype: dtype the adapter's tensors had on disk.
    """
    r = site.rank
    dtypes = (stored_dtype, weight.dtype)
    return _close(site.A, weight[:r, :], dtypes) and _close(site.B, weight[:, :r], dtypes)


def is_tied(sites: dict[tuple[int, str], SiteWeights], base: BaseModel, stored_dtype: torch.dtype) -> bool:
    """True when every site is tied to ``base`` (see :func:`site_is_tied`) and there is one."""
    return bool(sites) and all(site_is_tied(s, base.weight(layer, module), stored_dtype)
                               for (layer, module), s in sites.items())


def tie_to_base(sites: dict[tuple[int, str], SiteWeights], base: BaseModel) -> None:
    """Replace every site's A and B by views of the base weight (no copy), in place.

    After this the adapter owns only N (and bias); A and B share the base weight's storage,
    in the base's compute dtype.
    """
    for (layer, module), s in sites.items():
        w = base.weight(layer, module)
        s.A, s.B = w[: s.rank, :], w[:, : s.rank]
