"""The values an adapter may hold: finite, and small enough that serving it stays finite (DESIGN §3).

Finite stored values are not enough: 3e38 is a float32 but inf in bfloat16, and N entries of
1e30 are finite yet s·B(N(A x)) overflows, so every request on the tenant would fail. An adapter
is refused at load (upload, hot-swap, store, ``adapters inspect``) unless at every site, for
every activation x with |x_i| <= MAX_ACTIVATION (X):

1. every row of |A|, |N|, |B| sums to at most FMAX, and every |b| is at most FMAX: each value
   is finite in every serving dtype;
2. s·‖N‖∞ <= FMAX: the scaled N the pools hold is finite;
3. |A x|∞ <= ‖A‖∞ X <= FMAX and |s N A x|∞ <= s‖N‖∞ ‖A‖∞ X <= FMAX: the layer's intermediates;
4. its output Δy = s (B N A x + b) has |Δy|∞ <= ‖B‖∞ s‖N‖∞ ‖A‖∞ X + s|b|∞ <= sqrt(FMAX / out),
   so the sum of squares the next RMSNorm takes over it (and attention's q·k) stays finite too.

‖M‖∞ is the largest row sum of |M|, the most |M x|∞ can be for |x_i| <= 1. These are upper
bounds: an adapter near them may be refused though no real input would overflow; the adapters
of tests/data/cases reach at most 2.4e6 in rule 4 (exactly, from s·B·N·A), 11 orders of
magnitude below its limit (7.7e17 at out = 576).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nlora_serve.adapters.adapter import SiteWeights
from nlora_serve.adapters.keys import PART_A, PART_B, PART_BIAS, PART_N, tensor_key
from nlora_serve.errors import AdapterError
from nlora_serve.models.base import BaseModel
from nlora_serve.models.dtype import DTYPES
from nlora_serve.models.spec import ModelSpec, Site


# The smallest largest-finite-value of the serving dtypes (bfloat16's 3.39e38): an adapter valid on
# one server is valid on any, whatever its --dtype, and `adapters inspect` in float32 says the same.
FMAX = min(torch.finfo(d).max for d in DTYPES.values())
# Activations the bounds hold for: hidden-state entries of Llama-family models reach thousands at
# most (the "massive activations" of Sun et al. 2024, arXiv 2402.17762); 1e4 is above them.
MAX_ACTIVATION = 1e4
SMALL = 4096  # row_sum_max stacks tensors of at most this many elements
MAX_TIED_FAMILIES = 64  # tied families whose A, B norms stay cached on the base model


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Every stored value is finite (NaN and inf are named with their key and count).

    Raises:
        AdapterError: a tensor holds NaN or inf.
    """
    # One pass over everything first (a hot-swap validates 210 small tensors); name the key after.
    if all(torch.isfinite(torch.cat([t.reshape(-1) for t in group])).all()
           for group in _by_dtype(tensors.values())):
        return
    for key, t in sorted(tensors.items()):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise AdapterError(f"tensor {key!r} has {bad} non-finite value(s) (NaN or inf) of {t.numel()}; "
                               "refusing it so no NaN reaches a shared batch")


def _by_dtype(tensors) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def row_sum_max(tensors: list[torch.Tensor]) -> np.ndarray:
    """``‖M‖∞`` (the largest row sum of |M|) of each 2-D tensor: [len(tensors)] float64.

    Summed in float32 (a sum past float32's range is over FMAX however it is rounded); the ones
    that overflow are summed again in float64, so a message can say by how much. Small tensors
    of one shape (every N of an adapter) are stacked: a few ops, not a few per tensor."""
    out = torch.empty(len(tensors), dtype=torch.float32)
    small: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() <= SMALL:
            small.setdefault(tuple(t.shape), []).append(i)
        else:
            out[i] = t.abs().sum(-1, dtype=torch.float32).amax()
    for index in small.values():
        stacked = torch.stack([tensors[i] for i in index])
        out[index] = stacked.abs().sum(-1, dtype=torch.float32).amax(-1)
    norms = out.numpy().astype(np.float64)
    for i in np.flatnonzero(~np.isfinite(norms)):
        norms[i] = float(tensors[i].to(torch.float64).abs().sum(-1).amax())
    return norms


def tied_norms(base: BaseModel, family: str, sites: dict[Site, SiteWeights]) -> tuple[np.ndarray, np.ndarray]:
    """``(‖A‖∞, ‖B‖∞)`` per site of a tied family, from the base's own W[:r, :] and W[:, :r]: the
    same for every tenant of the family, so kept on ``base`` (up to MAX_TIED_FAMILIES, then
    cleared) instead of reading r·(in + out) values again at every registration."""
    cache = base.derived.setdefault("bounds.tied_norms", {})
    norms = cache.get(family)
    if norms is None:
        weights = [(base.weight(*site), s.rank) for site, s in sites.items()]
        norms = (row_sum_max([w[:r, :] for w, r in weights]), row_sum_max([w[:, :r] for w, r in weights]))
        if len(cache) >= MAX_TIED_FAMILIES:
            cache.clear()
        cache[family] = norms
    return norms


def site_limits(sites: dict[Site, SiteWeights],
                ab: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Check rules 1-4 at every site; return, per site, the most s·‖N‖∞ may be there with the
    site's A, B and b (what a hot-swap of N alone checks: :func:`check_swapped_n`).

    Args:
        sites: validated sites (any float dtype), in the adapter's order.
        ab: ``(‖A‖∞, ‖B‖∞)`` per site when known (:func:`tied_norms`); else read from ``sites``.
    Returns:
        [len(sites)] float64.
    Raises:
        AdapterError: a rule fails; the message names the tensor (or lora_alpha), the bound it
            reaches and the limit.
    """
    values = list(sites.values())
    a, b = ab if ab is not None else (row_sum_max([s.A for s in values]), row_sum_max([s.B for s in values]))
    n = row_sum_max([s.N for s in values])
    bias = np.array([0.0 if s.bias is None else float(s.bias.to(torch.float64).abs().max()) for s in values])
    scaling = np.array([abs(s.scaling) for s in values], dtype=np.float64)
    out = np.array([s.B.shape[0] for s in values], dtype=np.float64)
    X = MAX_ACTIVATION
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN compare False: refused below
        ok = ((a <= FMAX) & (n <= FMAX) & (b <= FMAX) & (bias <= FMAX) & (scaling * n <= FMAX) & (a * X <= FMAX)
              & (scaling * n * a * X <= FMAX) & (b * scaling * n * a * X + scaling * bias <= np.sqrt(FMAX / out)))
    for i in np.flatnonzero(~ok):  # the first site that fails, with its message
        _check_site(values[i], a[i], n[i], b[i], bias[i])
    with np.errstate(divide="ignore", invalid="ignore"):
        by_a = np.where(a > 0, FMAX / (a * X), np.inf)
        by_out = np.where(a * b > 0, (np.sqrt(FMAX / out) - scaling * bias) / (b * a * X), np.inf)
    return np.minimum(np.minimum(by_a, by_out), FMAX)


def check_swapped_n(sites: dict[Site, SiteWeights], limits: np.ndarray, n_norms: np.ndarray) -> None:
    """Rules 1-4 for sites whose N alone changed (their A, B and b passed :func:`site_limits`,
    whose ``limits`` fold rules 2-4 into one bound on s·‖N‖∞ per site): a few numpy ops.

    Args:
        sites: the new sites. limits: :func:`site_limits` of the version they replace.
        n_norms: ``‖N‖∞`` of each new N, [len(sites)] float64.
    Raises:
        AdapterError: as :func:`site_limits`, for the first site that fails.
    """
    scaling = np.fromiter((abs(s.scaling) for s in sites.values()), dtype=np.float64, count=len(sites))
    bad = np.flatnonzero(~((n_norms <= FMAX) & (scaling * n_norms <= limits)))  # NaN fails too
    for i in bad:
        site = list(sites.values())[i]
        a, b = row_sum_max([site.A, site.B])
        bias = 0.0 if site.bias is None else float(site.bias.to(torch.float64).abs().max())
        _check_site(site, a, n_norms[i], b, bias)


def _check_site(site: SiteWeights, a: float, n: float, b: float, bias: float) -> None:
    # Python floats: a product past float64 is inf, where numpy's scalars wrote "RuntimeWarning:
    # overflow encountered in scalar multiply" to the server's stderr (lora_alpha 1e308)
    a, n, b, bias = float(a), float(n), float(b), float(bias)
    key = lambda part: tensor_key(site.layer, site.module, part)  # noqa: E731
    for part, value, what in ((PART_A, a, "a row of |A| sums to"), (PART_N, n, "a row of |N| sums to"),
                              (PART_B, b, "a row of |B| sums to"), (PART_BIAS, bias, "an entry of |b| is")):
        if not value <= FMAX:  # NaN fails too
            raise AdapterError(f"tensor {key(part)!r}: {what} {value:.3g}, over {FMAX:.3g} (bfloat16's largest "
                               "value): it would not be finite in the serving dtype")
    s = abs(site.scaling)
    X, out = MAX_ACTIVATION, site.B.shape[0]
    factors = {PART_A: a, PART_N: s * n, PART_B: b}

    def blame(*parts: str) -> str:  # the largest factor of the product that overflows
        part = max(parts, key=factors.__getitem__)
        if part == PART_N and not site.has_n:
            return f"lora_alpha (scaling {site.scaling:g})"
        return f"tensor {key(part)!r}"

    stages = [
        (blame(PART_N), "scaling times N", s * n, FMAX, "the scaled N the server holds"),
        (blame(PART_A), "A·x", a * X, FMAX, "it"),
        (blame(PART_A, PART_N), "s·N·A·x", s * n * a * X, FMAX, "it"),
        (blame(PART_A, PART_N, PART_B), "the layer's output s·(B·N·A·x + b)", b * s * n * a * X + s * bias,
         math.sqrt(FMAX / out), "its sum of squares (the next RMSNorm's)"),
    ]
    for i, (who, stage, value, limit, keeps) in enumerate(stages):
        if not value <= limit:
            inputs = "" if i == 0 else f" for activations up to {X:g}"
            raise AdapterError(
                f"{who} at {ModelSpec.module_path(site.layer, site.module)}: {stage} can reach {value:.3g}{inputs}, "
                f"over the {limit:.3g} that keeps {keeps} finite in bfloat16 "
                f"(scaling {site.scaling:g}; largest row sums of |A| {a:.3g}, |N| {n:.3g}, |B| {b:.3g})")
