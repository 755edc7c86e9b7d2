"""``adapters convert``: NLoRA → plain PEFT LoRA (fold N into B) and LoRA → NLoRA (N = I).

Folding is exact up to float rounding: B' = B · N is computed in float64 and cast once, so
s · B' · A = s · B · N · A (DESIGN §3), for engines that only know two-matrix LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nlora_serve.adapters.adapter import Adapter, SiteWeights
from nlora_serve.adapters.config import parse_config
from nlora_serve.adapters.loader import DEFAULT_MAX_RANK, assemble_adapter, read_adapter
from nlora_serve.adapters.save import write_adapter
from nlora_serve.errors import AdapterError
from nlora_serve.models.base import BaseModel

CONVERSIONS = ("lora", "nlora")


def _rebuilt(adapter: Adapter, base: BaseModel, sites: dict, init_lora_weights) -> Adapter:
    raw = {k: v for k, v in adapter.config.raw.items() if k != "nlora_serve"}
    raw["init_lora_weights"] = init_lora_weights
    return assemble_adapter(parse_config(raw), sites, base, adapter.stored_dtype,
                            source=f"convert:{adapter.source}")


def to_lora(adapter: Adapter, base: BaseModel) -> Adapter:
    """The same maths as plain LoRA: per site B' = B @ N (float64, then float32), no lora_N.

    A tied adapter's A and B are written out in full (engines without tying need them).
    """
    sites = {}
    for key, s in adapter.sites.items():
        folded = (s.B.to(torch.float64) @ s.N.to(torch.float64)).float()
        sites[key] = SiteWeights(layer=s.layer, module=s.module, rank=s.rank, scaling=s.scaling,
                                 A=s.A.float().clone(), N=torch.eye(s.rank), B=folded,
                                 bias=None if s.bias is None else s.bias.float(), has_n=False)
    init = adapter.config.init_lora_weights
    return _rebuilt(adapter, base, sites, init if isinstance(init, bool) else True)


def to_nlora(adapter: Adapter, base: BaseModel) -> Adapter:
    """The same maths in three-matrix form: N = I where the adapter has none."""
    sites = {key: SiteWeights(layer=s.layer, module=s.module, rank=s.rank, scaling=s.scaling,
                              A=s.A.float().clone(), N=s.N.float().clone(), B=s.B.float().clone(),
                              bias=None if s.bias is None else s.bias.float(), has_n=True)
             for key, s in adapter.sites.items()}
    return _rebuilt(adapter, base, sites, adapter.config.init_lora_weights)


def convert_dir(src: str | Path, to: str, out: str | Path, base: BaseModel, *,
                max_rank: int = DEFAULT_MAX_RANK) -> Adapter:
    """Read ``src``, convert it ``to`` ``lora`` or ``nlora``, write it (full form) to ``out``.

    Raises:
        AdapterError: ``src`` is refused by the reader, ``to`` is unknown, or ``out`` holds an adapter.
    """
    if to not in CONVERSIONS:
        raise AdapterError(f"--to {to!r}: expected one of {', '.join(CONVERSIONS)}")
    adapter = read_adapter(src, base, max_rank=max_rank, max_bytes=None)
    converted = (to_lora if to == "lora" else to_nlora)(adapter, base)
    write_adapter(converted, out)
    return converted
