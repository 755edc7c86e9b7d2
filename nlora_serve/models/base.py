"""The loaded base model: directory, shapes, weights by name, fingerprint, tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nlora_serve.models.resolve import MARKER, resolve_model
from nlora_serve.models.spec import ModelSpec, read_spec
from nlora_serve.models.weights import fingerprint, load_weights


@dataclass(slots=True)
class BaseModel:
    """One base model, loaded once and shared by every tenant."""

    path: Path  # the prepared Hugging Face directory
    spec: ModelSpec
    dtype: torch.dtype  # compute dtype the weights were cast to
    weights: dict[str, torch.Tensor] = field(repr=False)  # HF name -> tensor, in ``dtype``
    fingerprint: str  # sha256 hex of the stored weights (before the cast), see weights.fingerprint

    def weight(self, layer: int, module: str) -> torch.Tensor:
        """``[out, in]`` weight of one projection, e.g. ``weight(3, "q_proj")``."""
        return self.weights[f"{ModelSpec.module_path(layer, module)}.weight"]

    def tokenizer(self):
        """The model's Hugging Face tokenizer (with its chat template)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


def load_base(model: str = "default", dtype: torch.dtype = torch.float32,
              cache_dir: str | os.PathLike | None = None) -> BaseModel:
    """Resolve (converting on first use) and load a base model.

    Raises:
        ModelError: see :func:`nlora_serve.models.resolve.resolve_model`.
    """
    path = resolve_model(model, cache_dir)
    stored = load_weights(path)
    marker = path / MARKER
    fp = json.loads(marker.read_text())["fingerprint"] if marker.is_file() else fingerprint(stored)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in stored.items()}
    return BaseModel(path=path, spec=read_spec(path), dtype=dtype, weights=weights, fingerprint=fp)


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32):
    """The transformers model for a prepared directory (the reference implementation; tests, tune)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
