"""Rotary position embeddings of the Llama family, as transformers computes them.

RoPE types: ``default``, ``linear`` (positions divided by ``factor``) and ``llama3`` (Llama 3.1+:
low frequencies divided by ``factor``, high ones kept, a smooth blend between; transformers'
``_compute_llama3_parameters``, after Meta's reference code).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from nlora_serve.errors import ModelError

SUPPORTED = ("default", "linear", "llama3")


def rope_config(config_path: Path) -> tuple[dict, float]:
    """``(rope parameters, rms_norm_eps)`` from a config.json (transformers 4 and 5 spellings).

    The parameters always hold ``rope_type`` and ``rope_theta``.

    Raises:
        ModelError: a RoPE type outside :data:`SUPPORTED`, or llama3 without its fields.
    """
    cfg = json.loads(Path(config_path).read_text())
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in SUPPORTED:
        raise ModelError(f"{config_path}: rope_type {rope['rope_type']!r} is not supported; expected one of "
                         f"{', '.join(SUPPORTED)}")
    if rope["rope_type"] == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in rope]
        if missing:
            raise ModelError(f"{config_path}: llama3 rope parameters lack {', '.join(missing)}")
    return rope, float(cfg.get("rms_norm_eps", 1e-6))


def inv_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies; positions are divided by the linear factor apart."""
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if rope["rope_type"] != "llama3":
        return inv_freq
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long waves slowed down
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(head_dim: int, max_len: int, rope: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` [max_len, head_dim] float32 for the half-rotation RoPE of HF Llama.

    ``sin``'s first half is negated, so rotating is ``x * cos + swap_halves(x) * sin`` (no negation op).
    """
    scale = float(rope.get("factor", 1.0)) if rope["rope_type"] == "linear" else 1.0
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32) / scale, inv_frequencies(head_dim, rope))
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-angles.sin(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate ``x`` [T, heads, D] by float32 ``cos``, signed ``sin`` [T, 1, D] from :func:`rope_tables`.

    Computed in float32 and returned in ``x.dtype`` (bf16 angles lose too much at long positions).
    ``out``: a [T, heads, D] tensor of ``x.dtype`` to write into (a CUDA graph's static buffer);
    the float32 result is rounded once on the store, as ``.to`` rounds it.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    if out is not None:
        return torch.addcmul(x * cos, swapped, sin, out=out)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)
