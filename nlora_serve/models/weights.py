"""Base weights by module name, read from safetensors only, and the base fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from nlora_serve.errors import ModelError

if TYPE_CHECKING:  # torch loads where tensors are read or hashed: resolving a model folder needs none
    import torch


def safetensors_files(model_dir: Path) -> list[Path]:
    """The model's ``*.safetensors`` files, sorted.

    Raises:
        ModelError: there are none (a pickled ``pytorch_model.bin`` is never opened).
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in Path(model_dir).iterdir()) if Path(model_dir).is_dir() else []
        raise ModelError(f"{model_dir}: no *.safetensors weights (found {found[:6]}); only safetensors "
                         "is loaded, pickled .bin/.pt files are never opened")
    return files


def load_weights(model_dir: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the model, by their Hugging Face names (e.g. ``model.layers.0.mlp.up_proj.weight``).

    Args:
        dtype: cast floating tensors to this dtype once, here; None keeps the stored dtype.

    Raises:
        ModelError: no safetensors file, or one that cannot be parsed (named in the message).
    """
    weights: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    weights[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
    return weights


def fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """The base fingerprint: sha256 over every tensor's name, dtype, shape and bytes, names sorted.

    Independent of sharding and file layout; adapters pin it in their family key (DESIGN §3).
    Returns a 64-character hex string.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
