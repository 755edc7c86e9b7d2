"""Adapter directory writing: every file via a temp file, fsync and rename (never half-written).

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT layout).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from nlora_serve.adapters.config import CONFIG_NAME
from nlora_serve.adapters.format import WEIGHTS_NAME
from nlora_serve.errors import AdapterError


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same directory, fsync, rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an adapter is a shareable artefact
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_dir(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` as a PEFT-style adapter directory.

    Args:
        out_dir: created if missing; must not already hold an adapter.
        config: the adapter_config.json object.
        tensors: file key -> tensor (written contiguous, in its dtype).

    Raises:
        AdapterError: ``out_dir`` already holds adapter_config.json or adapter_model.safetensors, or
            cannot be created or written (a file of that name, no permission, disk full: named).
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError: a file of that name
        raise AdapterError(f"{out_dir}: cannot create the adapter directory ({exc.strerror or exc})") from None
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if (out_dir / name).exists():
            raise AdapterError(f"{out_dir / name} already exists; refusing to overwrite an adapter")
    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    try:
        _atomic_write(out_dir / WEIGHTS_NAME, lambda p: save_file(data, p, metadata={"format": "pt"}))
        _atomic_write(out_dir / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    except OSError as exc:
        raise AdapterError(f"{out_dir}: cannot write the adapter ({exc.strerror or exc})") from None
    return out_dir
