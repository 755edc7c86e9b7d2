"""Helpers of the residency tests (test_residency.py, test_lora_slot_share.py): adapters with
distinct weights, their registry versions, two LoRA slots shared by tenants, and the check of a
refused LoRA slot."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from nlora_serve.adapters.adapter import Adapter, content_hash
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.runtime.residency import PoolFull, Residency, SlotBusy
from nlora_serve.adapters.save import write_adapter
from nlora_serve.adapters.runtime.version import AdapterVersion


def perturbed(adapter: Adapter, seed: int, scale: float = 0.05) -> Adapter:
    """Give every site a distinct N (and B for SLoRA, whose B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    for s in adapter.sites.values():
        s.N = s.N + scale * torch.randn(s.N.shape, generator=gen, dtype=s.N.dtype)
        s.has_n = True
        if not adapter.is_tied:
            s.B = s.B + scale * torch.randn(s.B.shape, generator=gen, dtype=s.B.dtype)
    # the hash of its new maths, as a read of its written folder gives it: a cold load checks it
    adapter.content_hash = content_hash(adapter.sites, adapter.family_key)
    return adapter


def version(name: str, adapter: Adapter, path=None) -> AdapterVersion:
    return AdapterVersion(name, 1, adapter, path)


class SharedSlots:
    """A Residency of 2 LoRA slots shared by tenants (fair shares, weights 1), with a rank-4 SLoRA
    adapter of distinct weights admitted under each of ``names`` (``versions``: name -> version)."""

    def __init__(self, base, tmp_path, names: tuple[str, ...]):
        self.residency = Residency(base, lambda p, _hash: read_adapter(p, base), tied_budget=1 << 30, max_loras=2,
                                   max_rank=16, tenant_shares={})
        self.versions = {}
        for i, name in enumerate(names):
            a = perturbed(init_adapter(base, rank=4, targets=["q_proj"], variant="slora", seed=i), i)
            self.versions[name] = version(name, a, write_adapter(a, tmp_path / name))
            self.residency.admit(self.versions[name])

    def pin(self, name: str, tenant: str) -> None:
        """A request of ``tenant`` on ``name``: the registry's pin, then residency's (PoolFull: neither)."""
        self.versions[name].refcount += 1
        try:
            self.residency.ensure_resident(self.versions[name], tenant)
        except PoolFull:
            self.versions[name].refcount -= 1
            raise

    def unpin(self, name: str, tenant: str) -> None:
        """That request ended."""
        self.residency.unpin(self.versions[name], tenant)
        self.versions[name].refcount -= 1


def refused(caplog, call, name: str, detail: str) -> None:
    """``call`` is refused a LoRA slot for adapter ``name`` for now (SlotBusy: the native engine keeps
    the request waiting for one, tests/engine/test_lora_slot_wait.py), in one fixed text that names its
    adapter only (no count, no other tenant, no waiting), whether every slot is held or its share is,
    and the operator's INFO log line matches ``detail``."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nlora_serve.adapters.runtime.residency"):
        with pytest.raises(SlotBusy) as err:
            call()
    text = str(err.value)
    assert text == f"adapter {name!r}: no LoRA adapter slot is free for it now (the server is busy); retry shortly"
    rest = text.replace(repr(name), "")
    assert not any(c.isdigit() for c in rest) and not any(w in rest for w in ("bob", "carol", "tenant", "wait"))
    assert re.search(detail, caplog.text), caplog.text
