"""Hot-swap of a tied tenant's N: validate the N-only payload against the version it replaces.

The current version already passed every check of the reader (config, targets, ranks, family),
and a swap changes only N, so the payload is checked for exactly what may differ: the same
``lora_N`` keys, shapes [r, r], an accepted dtype, finite values and the magnitude bounds of
bounds.py (against the limits the current version's A, B and bias set). This keeps the swap path
(DESIGN §9: p99 < 20 ms, durable write included) to one parse of the payload and a few
tensor ops, instead of re-planning 210 sites from the config.

When every N has one dtype and one rank (the usual tenant), the payload is decoded as one stacked
array and checked once, not once per site: under load each tensor op is a point where the swap
thread gives up the GIL and may have to wait for it while the engine thread runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from nlora_serve.adapters.adapter import Adapter, SiteWeights, content_hash
from nlora_serve.adapters.bounds import check_swapped_n, row_sum_max
from nlora_serve.adapters.file_read import CONFIG_FILE, WEIGHTS_FILE
from nlora_serve.adapters.format import STORED_DTYPES, read_bytes, read_stacked
from nlora_serve.adapters.keys import PART_N, tensor_key
from nlora_serve.adapters.runtime.pool import serial_rows
from nlora_serve.adapters.save import full_form_with_n
from nlora_serve.errors import AdapterError, shown


def replace_n(current: Adapter, weights: bytes) -> Adapter:
    """A new tied adapter equal to ``current`` but for N, read from ``weights``.

    Args:
        current: a tied adapter (A and B are views of the base weight) or a compressed family
            member (A and B are the family's shared factors).
        weights: safetensors bytes holding exactly ``current``'s ``...lora_N.weight`` keys.

    Raises:
        AdapterError: ``current`` is untied, or the payload has other keys, other shapes, an
            unsupported dtype or non-finite values (the message names the key and the numbers).
    """
    if not current.is_tied and current.shared_family is None:
        raise AdapterError(f"hot-swap of N needs a tied (IntTune) tenant; this one is {current.flavour}: "
                           "upload the whole adapter instead (a compressed family member swaps N too)")
    keys = [tensor_key(layer, module, PART_N) for layer, module in current.sites]  # site order
    header, stacked = read_stacked(weights, keys)  # stacked: [sites, r, r] float32, None if mixed
    _check_keys(set(header), set(keys))
    for key, site in zip(keys, current.sites.values()):
        if header[key][1] != (site.rank, site.rank):
            raise AdapterError(f"tensor {key!r} has shape {list(header[key][1])}, expected "
                               f"[{site.rank}, {site.rank}] (the tenant's rank)")
    if stacked is None:
        tensors = read_bytes(weights)[1]
        n32 = [tensors[k].to(torch.float32) for k in keys]
        finite = bool(torch.isfinite(torch.cat([n.reshape(-1) for n in n32])).all())
    else:
        n32 = torch.from_numpy(stacked).unbind(0)  # views, no copy
        finite = bool(np.isfinite(stacked).all())
    if not finite:
        key = next(k for k, n in zip(keys, n32) if not torch.isfinite(n).all())
        raise AdapterError(f"tensor {key!r} has non-finite values (NaN or inf); refusing it so no NaN "
                           "reaches a shared batch")
    sites = {s: _with_n(site, n) for (s, site), n in zip(current.sites.items(), n32)}
    n_norms = row_sum_max(n32) if stacked is None else np.abs(stacked).sum(axis=2, dtype=np.float64).max(axis=1)
    check_swapped_n(sites, current.n_limits, n_norms)  # finite values may still overflow when served
    digest = content_hash(sites, current.family_key or current.shared_family)
    if current.dtype != torch.float32:  # cast once, as the reader does (in pieces torch runs serially)
        if stacked is not None:
            pieces = torch.from_numpy(stacked).split(serial_rows(stacked[0].size))
            cast = [n for piece in pieces for n in piece.to(current.dtype).unbind(0)]
        else:
            cast = [n.to(current.dtype) for n in n32]
        for site, n in zip(sites.values(), cast):
            site.N = n
    stored = max((STORED_DTYPES[d] for d, _ in header.values()), key=lambda d: torch.finfo(d).eps)
    return dataclasses.replace(current, sites=sites, content_hash=digest, stored_dtype=stored,
                               source="hot-swap")


def _with_n(site: SiteWeights, n: torch.Tensor) -> SiteWeights:
    """``site`` with a new N (a plain constructor call: dataclasses.replace costs ~5x more, per site)."""
    return SiteWeights(site.layer, site.module, site.rank, site.scaling, site.A, n, site.B, site.bias, True)


def _check_keys(got: set[str], want: set[str]) -> None:
    if got == want:
        return
    extra, missing = sorted(got - want), sorted(want - got)
    detail = (f"unexpected {[shown(key, 80) for key in extra[:3]]}{'…' if len(extra) > 3 else ''}" if extra else
              f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
    raise AdapterError(f"swap payload must hold exactly the tenant's {len(want)} lora_N keys; "
                       f"it has {len(got)}: {detail}")


def full_form_swap(store, load_files, current, weights: bytes) -> tuple[dict[str, bytes], Adapter]:
    """A swap's new version of a tied tenant stored in the full form (a lora_B bias keeps it
    there): ``current``'s weights file (an AdapterVersion in ``store``, an AdapterStore) with the
    payload's N, and the adapter read back from it by ``load_files`` with ``current``'s config, so
    that what is served is what a restart loads (content hash included: the bias is hashed as
    stored, not in the compute dtype).

    Raises:
        FileNotFoundError: ``current``'s folder was removed (it was superseded).
        AdapterError: the new files do not validate.
    """
    config = stored_file(store, current, CONFIG_FILE)
    new = full_form_with_n(stored_file(store, current, WEIGHTS_FILE), weights)
    return {WEIGHTS_FILE: new}, load_files({CONFIG_FILE: config, WEIGHTS_FILE: new})


def stored_file(store, version, fname: str) -> bytes:
    """One file of ``version``'s folder (an AdapterVersion), read through ``store`` (an
    AdapterStore; no link followed).

    Raises:
        FileNotFoundError: the folder was removed (the version was superseded).
        AdapterError: the file is missing, a link or not a regular file.
    """
    files = store.read_files(version.path, (fname,))
    if fname not in files:
        raise AdapterError(f"adapter {version.name!r} v{version.version}: its folder {version.path} has no {fname}")
    return files[fname]
