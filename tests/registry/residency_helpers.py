"""Helpers of the residency tests (test_residency.py, test_lora_slot_share.py): adapters with
distinct weights, their registry versions, and the check of a refused LoRA slot."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.version import AdapterVersion
from nlora_serve.adapters.residency import SlotBusy


def perturbed(adapter: Adapter, seed: int, scale: float = 0.05) -> Adapter:
    """Give every site a distinct N (and B for SLoRA, whose B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    for s in adapter.sites.values():
        s.N = s.N + scale * torch.randn(s.N.shape, generator=gen, dtype=s.N.dtype)
        s.has_n = True
        if not adapter.is_tied:
            s.B = s.B + scale * torch.randn(s.B.shape, generator=gen, dtype=s.B.dtype)
    return adapter


def version(name: str, adapter: Adapter, path=None) -> AdapterVersion:
    return AdapterVersion(name, 1, adapter, path)


def refused(caplog, call, name: str, detail: str) -> None:
    """``call`` is refused a LoRA slot for adapter ``name`` for now (SlotBusy: the native engine keeps
    the request waiting for one, tests/engine/test_lora_slot_wait.py), in one fixed text that names its
    adapter only (no count, no other tenant, no waiting), whether every slot is held or its share is,
    and the operator's INFO log line matches ``detail``."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nlora_serve.adapters.residency"):
        with pytest.raises(SlotBusy) as err:
            call()
    text = str(err.value)
    assert text == f"adapter {name!r}: no LoRA adapter slot is free for it now (the server is busy); retry shortly"
    rest = text.replace(repr(name), "")
    assert not any(c.isdigit() for c in rest) and not any(w in rest for w in ("bob", "carol", "tenant", "wait"))
    assert re.search(detail, caplog.text), caplog.text
