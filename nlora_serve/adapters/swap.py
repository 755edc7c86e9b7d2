"""Hot-swap of a tied tenant's N: validate the N-only payload against the version it replaces.

The current version already passed every check of the reader (config, targets, ranks, family),
and a swap changes only N, so the payload is checked for exactly what may differ: the same
``lora_N`` keys, shapes [r, r], an accepted dtype and finite values. This keeps the swap path
(DESIGN §9: p99 < 20 ms, durable write included) to one parse of the payload and a few
tensor ops, instead of re-planning 210 sites from the config.
"""

from __future__ import annotations

import dataclasses

import torch

from nlora_serve.adapters.adapter import Adapter, content_hash
from nlora_serve.adapters.format import STORED_DTYPES, read_bytes
from nlora_serve.adapters.keys import PART_N, tensor_key
from nlora_serve.errors import AdapterError


def replace_n(current: Adapter, weights: bytes) -> Adapter:
    """A new tied adapter equal to ``current`` but for N, read from ``weights``.

    Args:
        current: a tied adapter (A and B are views of the base weight).
        weights: safetensors bytes holding exactly ``current``'s ``...lora_N.weight`` keys.

    Raises:
        AdapterError: ``current`` is untied, or the payload has other keys, other shapes, an
            unsupported dtype or non-finite values (the message names the key and the numbers).
    """
    if not current.is_tied:
        raise AdapterError(f"hot-swap of N needs a tied (IntTune) tenant; this one is {current.flavour}: "
                           "upload the whole adapter instead")
    header, tensors = read_bytes(weights)
    expected = {tensor_key(layer, module, PART_N): site for (layer, module), site in current.sites.items()}
    _check_keys(set(header), set(expected))
    for key, (_, shape) in header.items():
        r = expected[key].rank
        if shape != (r, r):
            raise AdapterError(f"tensor {key!r} has shape {list(shape)}, expected [{r}, {r}] (the tenant's rank)")
    stacked = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors.values()])
    if not torch.isfinite(stacked).all():
        key = next(k for k, t in sorted(tensors.items()) if not torch.isfinite(t).all())
        raise AdapterError(f"tensor {key!r} has non-finite values (NaN or inf); refusing it so no NaN "
                           "reaches a shared batch")
    sites = {s: dataclasses.replace(site, N=tensors[key].to(torch.float32), has_n=True)
             for key, site in expected.items() for s in [(site.layer, site.module)]}
    digest = content_hash(sites, current.family_key)
    for site in sites.values():
        site.N = site.N.to(current.dtype)
    stored = max((STORED_DTYPES[d] for d, _ in header.values()), key=lambda d: torch.finfo(d).eps)
    return dataclasses.replace(current, sites=sites, content_hash=digest, stored_dtype=stored,
                               source="hot-swap")


def _check_keys(got: set[str], want: set[str]) -> None:
    if got == want:
        return
    extra, missing = sorted(got - want), sorted(want - got)
    detail = (f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''}" if extra else
              f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
    raise AdapterError(f"swap payload must hold exactly the tenant's {len(want)} lora_N keys; "
                       f"it has {len(got)}: {detail}")
