"""Random base weights from ``config.json`` alone (vLLM's ``--load-format dummy``).

For model shapes that ship no weights here (e.g. a Llama-3-8B-shaped config under ``bench/``), so
they can be served and measured. Initialised as transformers initialises a Llama: projections and
embeddings ~ N(0, initializer_range²), norms = 1 (Qwen3's q/k head norms too), biases = 0; seeded,
so two loads are identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from nlora_serve.models.spec import PROJECTIONS, ModelSpec

DUMMY_SEED = 0


def dummy_weights(model_dir: Path, spec: ModelSpec, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor a Llama-family model of ``spec`` needs, by its Hugging Face name, in ``dtype``.

    Args:
        model_dir: the directory holding config.json (read for ``initializer_range``).
        device: where the random numbers are drawn (a GPU draws 8B of them in a second); the
            result lives there.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    std = float(cfg.get("initializer_range", 0.02))
    gen = torch.Generator(device=device).manual_seed(DUMMY_SEED)
    # Drawn in fp32 (fp64 for fp64), then rounded: the bf16 model is the fp32 one rounded, which
    # bench/gpu_engine_check.py's fp32 reference and tied tenants assume. On the CPU a draw straight
    # into bf16 is another stream (torch 2.11: every value; 2.13: the last 16 of a size that is no
    # multiple of 16); CUDA draws bf16 from fp32 values already, so GPU weights are unchanged.
    draw_dtype = torch.promote_types(dtype, torch.float32)

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=draw_dtype, device=device).normal_(0.0, std, generator=gen).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    weights = {"model.embed_tokens.weight": normal(spec.vocab_size, spec.hidden_size),
               "model.norm.weight": ones(spec.hidden_size)}
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = normal(spec.vocab_size, spec.hidden_size)
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = ones(spec.hidden_size)
        weights[f"{prefix}.post_attention_layernorm.weight"] = ones(spec.hidden_size)
        if spec.qk_norm:
            for name in ModelSpec.qk_norm_paths(layer):
                weights[name] = ones(spec.head_dim)
        for module in PROJECTIONS:
            name = ModelSpec.module_path(layer, module)
            weights[f"{name}.weight"] = normal(*spec.projection_shape(module))
            if spec.attention_bias and module in ("q_proj", "k_proj", "v_proj"):
                weights[f"{name}.bias"] = torch.zeros(spec.projection_shape(module)[0], dtype=dtype,
                                                      device=device)
    return weights


def dummy_fingerprint(model_dir: Path) -> str:
    """The base fingerprint of dummy weights: sha256 over the config and the seed (64 hex).

    Adapters pin it in their family key, so a tenant made for random weights is never served on
    real ones of the same shape.
    """
    config = (Path(model_dir) / "config.json").read_bytes()
    return hashlib.sha256(b"nlora-serve dummy weights, seed %d\n" % DUMMY_SEED + config).hexdigest()
