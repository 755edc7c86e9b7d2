"""Example tied IntTune tenants for a fresh server (``serve --example-tenants N``).

Each example is a tied tenant at r=16 on all seven projections (A = W[:r, :], B = W[:, :r]) whose
N is small seeded noise around zero (the "zeros" IntTune start plus a nudge), so every tenant
answers coherently yet differently from the base model and from each other. The reference N
(W[:r, :r]) is not used: at s = 1 it adds B·W[:r, :r]·A to every weight and the model babbles.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # they load torch: imported where the examples are made, not for example_name
    from nlora_serve.adapters.runtime.manager import AdapterManager
    from nlora_serve.models.base import BaseModel

EXAMPLE_RANK = 16
NOISE = 0.1  # size of N's entries relative to the RMS of the Nyström N (W[:r, :r])


def example_name(index: int) -> str:
    """The ``index``-th example's adapter name (serve's flag checks use it without torch)."""
    return f"tenant-{index:03d}"


def ensure_example_tenants(base: BaseModel, adapters: AdapterManager, count: int) -> list[str]:
    """Register ``tenant-000`` ... ``tenant-{count-1}`` where not already registered (nor
    unloaded by an operator: :meth:`AdapterManager.start_names`).

    Deterministic: tenant i's N is ``NOISE * rms(W[:r, :r]) * randn`` from seed i.
    Returns the example names served now (new and existing), in order.
    """
    import torch

    from nlora_serve.adapters.nystrom import init_adapter
    from nlora_serve.adapters.save import write_adapter

    names = [example_name(i) for i in range(count)]
    fresh = set(adapters.start_names(names))
    missing = [i for i, name in enumerate(names) if name in fresh]
    served = {v.name for v in adapters.versions()} | fresh
    if not missing:
        return [name for name in names if name in served]
    adapter = init_adapter(base, rank=EXAMPLE_RANK, targets="all-linear")
    nystrom_n = {site: s.N.clone() for site, s in adapter.sites.items()}
    with tempfile.TemporaryDirectory(prefix="nlora-examples-") as scratch:
        for i in missing:
            gen = torch.Generator().manual_seed(i)
            for site, s in adapter.sites.items():
                n = nystrom_n[site]
                rms = n.float().pow(2).mean().sqrt()
                s.N = (NOISE * rms * torch.randn(n.shape, generator=gen)).to(n.dtype)
            folder = write_adapter(adapter, f"{scratch}/{names[i]}", tied_form=True)
            adapters.register_dir(names[i], folder)
    return [name for name in names if name in served]
