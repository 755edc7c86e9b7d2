"""Write an in-memory adapter as a PEFT-style directory: full form or compact tied form."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.config import CONFIG_NAME, TIED_FORMAT
from nlora_serve.adapters.format import WEIGHTS_NAME
from nlora_serve.adapters.writing import Undo, write_dir
from nlora_serve.adapters.keys import PART_A, PART_B, PART_BIAS, PART_N, tensor_key
from nlora_serve.adapters.tied import TIED_INIT
from nlora_serve.errors import AdapterError


def config_dict(adapter: Adapter, *, tied_form: bool = False) -> dict:
    """The adapter_config.json object: the PEFT fields as read, plus ``nlora_serve`` for the
    compact tied form (format ``tied-n``, family key, base fingerprint, init)."""
    cfg = {k: v for k, v in adapter.config.raw.items() if k != "nlora_serve"}
    if tied_form:
        cfg["nlora_serve"] = {"format": TIED_FORMAT, "family": adapter.family_key,
                              "base_fingerprint": adapter.base_fingerprint, "init": TIED_INIT}
    return cfg


def tensor_dict(adapter: Adapter, *, tied_form: bool = False, dtype: torch.dtype | None = None
                ) -> dict[str, torch.Tensor]:
    """File key -> tensor. Full form: lora_A, lora_N (where the adapter has one), lora_B
    (+ lora_B.bias); compact tied form: lora_N only. ``dtype`` defaults to the adapter's.

    Raises:
        AdapterError: ``tied_form`` for an adapter that is not tied or has a lora_B bias.
    """
    if tied_form and not adapter.is_tied:
        raise AdapterError("the compact tied form needs a Nyström-tied adapter (A = W[:r, :], B = W[:, :r]); "
                           f"this one is {adapter.flavour}")
    dtype = dtype or adapter.dtype
    out = {}
    for (layer, module), s in adapter.sites.items():
        if tied_form and s.bias is not None:
            raise AdapterError(f"{tensor_key(layer, module, PART_BIAS)}: the compact tied form holds only "
                               "lora_N, not a lora_B bias")
        parts = {PART_N: s.N if s.has_n or tied_form else None}
        if not tied_form:
            parts.update({PART_A: s.A, PART_B: s.B, PART_BIAS: s.bias})
        out.update({tensor_key(layer, module, p): t.to(dtype).contiguous().clone()
                    for p, t in parts.items() if t is not None})
    return out


def write_adapter(adapter: Adapter, out_dir: str | Path, *, tied_form: bool = False,
                  dtype: torch.dtype | None = None, undo: Undo | None = None) -> Path:
    """Write ``adapter`` to ``out_dir`` (adapter_config.json + adapter_model.safetensors), all or
    nothing; ``undo`` as :func:`~nlora_serve.adapters.writing.write_dir`.

    Raises:
        AdapterError: see :func:`tensor_dict` and :func:`~nlora_serve.adapters.writing.write_dir`
            (``out_dir`` already holds an adapter, or cannot be written).
    """
    tensors = tensor_dict(adapter, tied_form=tied_form, dtype=dtype)
    return write_dir(Path(out_dir), config_dict(adapter, tied_form=tied_form), tensors, undo=undo)


def compact_tied_files(adapter: Adapter, weights: bytes) -> dict[str, bytes] | None:
    """The compact tied form of an uploaded full-form tied adapter, as store files; None when
    ``adapter`` is untied, already compact, or has a lora_B bias (which the compact form lacks).

    N comes from the uploaded bytes in their stored dtype (identity where the file has no lora_N),
    so the compact form hashes and serves exactly like the upload.
    """
    if not adapter.is_tied or adapter.config.tied is not None:
        return None
    if any(s.bias is not None for s in adapter.sites.values()):
        return None
    original = safetensors.torch.load(weights)
    n_keys = {}
    for (layer, module), s in adapter.sites.items():
        key = tensor_key(layer, module, PART_N)
        n_keys[key] = original[key] if key in original else torch.eye(s.rank, dtype=adapter.stored_dtype)
    config = json.dumps(config_dict(adapter, tied_form=True), indent=2) + "\n"
    return {CONFIG_NAME: config.encode(),
            WEIGHTS_NAME: safetensors.torch.save({k: v.contiguous() for k, v in n_keys.items()},
                                                 metadata={"format": "pt"})}


def full_form_with_n(weights: bytes, n_weights: bytes) -> bytes:
    """A full-form weights file with every ``lora_N`` tensor taken from ``n_weights`` (a validated
    hot-swap payload), as store bytes: the new version of a tied tenant that stays in the full form
    (it has a lora_B bias). A, B and the bias keep their bytes; N keeps the payload's dtype, so the
    file hashes and serves exactly like the swapped adapter. A file without lora_N gains them.
    """
    tensors = safetensors.torch.load(weights)
    tensors.update(safetensors.torch.load(n_weights))
    return safetensors.torch.save(tensors, metadata={"format": "pt"})
