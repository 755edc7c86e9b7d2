"""The loaded base model: directory, shapes, weights by name, fingerprint, tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nlora_serve.errors import ModelError
from nlora_serve.models.dummy import dummy_fingerprint, dummy_weights
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
    tokenizer_dir: Path | None = None  # where the tokenizer lives, when not in ``path``
    # values computed once from the weights by their users, by key (e.g. adapters/bounds.py's
    # norms of a tied family's A and B); each user bounds its own entries
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def weight(self, layer: int, module: str) -> torch.Tensor:
        """``[out, in]`` weight of one projection, e.g. ``weight(3, "q_proj")``."""
        return self.weights[f"{ModelSpec.module_path(layer, module)}.weight"]

    def tokenizer(self):
        """The model's Hugging Face tokenizer (with its chat template)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)

    @property
    def tokenizer_path(self) -> Path:
        """The directory the tokenizer and chat template are read from."""
        return self.tokenizer_dir if self.tokenizer_dir is not None else self.path


def load_base(model: str = "default", dtype: torch.dtype = torch.float32,
              cache_dir: str | os.PathLike | None = None, load_format: str = "auto",
              tokenizer: str | os.PathLike | None = None, init_device: torch.device | str = "cpu") -> BaseModel:
    """Resolve (converting on first use) and load a base model; its weights live on the CPU.

    Args:
        load_format: "auto" reads the weights; "dummy" draws random ones from config.json alone
            (:mod:`nlora_serve.models.dummy`; ``init_device`` draws them, e.g. on a GPU).
        tokenizer: a directory with the tokenizer (default: the model directory).

    Raises:
        ModelError: see :func:`nlora_serve.models.resolve.resolve_model`; for "dummy", a model
            that is not a directory with a config.json, or no tokenizer where one is looked for.
    """
    tok_dir = _tokenizer_dir(tokenizer)
    if load_format == "dummy":
        path = Path(model).expanduser().resolve()
        spec = read_spec(path)
        if tok_dir is None and not (path / "tokenizer_config.json").is_file():  # before drawing 8B numbers
            raise ModelError(f"{path}: no tokenizer_config.json beside config.json; pass a tokenizer "
                             "directory (--tokenizer DIR, e.g. bench/models/smollm2-135m)")
        weights = {k: v.cpu() for k, v in dummy_weights(path, spec, dtype, init_device).items()}
        return BaseModel(path=path, spec=spec, dtype=dtype, weights=weights,
                         fingerprint=dummy_fingerprint(path), tokenizer_dir=tok_dir)
    path = resolve_model(model, cache_dir)
    stored = load_weights(path)
    marker = path / MARKER
    fp = json.loads(marker.read_text())["fingerprint"] if marker.is_file() else fingerprint(stored)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in stored.items()}
    return BaseModel(path=path, spec=read_spec(path), dtype=dtype, weights=weights, fingerprint=fp,
                     tokenizer_dir=tok_dir)


def _tokenizer_dir(tokenizer: str | os.PathLike | None) -> Path | None:
    if tokenizer is None:
        return None
    path = Path(tokenizer).expanduser().resolve()
    if not (path / "tokenizer_config.json").is_file():
        raise ModelError(f"{path}: not a tokenizer directory (no tokenizer_config.json)")
    return path


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32):
    """The transformers model for a prepared directory (the reference implementation; tests, tune)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def check_max_len(base: BaseModel, max_model_len: int) -> None:
    """Refuse a ``max_model_len`` the model cannot serve exactly: past its max_position_embeddings, or
    past a sliding attention window (:func:`sliding_window`), which the engine does not run: it attends
    to the whole context, where transformers and vLLM see only the window's last tokens.

    Raises:
        ValueError: the numbers and the config file are in the message.
    """
    config = base.path / "config.json"
    cfg = json.loads(config.read_text())
    limit = cfg.get("max_position_embeddings")
    if limit is not None and max_model_len > limit:
        raise ValueError(f"SchedulerConfig.max_model_len={max_model_len} exceeds the model's "
                         f"max_position_embeddings {limit} ({config})")
    window = sliding_window(cfg)
    if window is not None and max_model_len > window:
        raise ValueError(f"SchedulerConfig.max_model_len={max_model_len} exceeds the model's sliding_window {window} "
                         f"({config}): the engine runs full attention only, which equals the model's sliding-window "
                         f"attention up to {window} tokens; lower --max-model-len to {window}")


def sliding_window(cfg: dict) -> int | None:
    """The attention window (tokens) some layer of a config.json's model slides, or None when every
    layer attends to the whole context: transformers' ``layer_types`` where the config lists them,
    else Mistral's ``sliding_window``, Qwen2's and Qwen3's with ``use_sliding_window`` on a layer at
    or past ``max_window_layers``."""
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool):
        return None
    if cfg.get("layer_types") is not None:
        return window if "sliding_attention" in cfg["layer_types"] else None
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") in ("qwen2", "qwen3") or {"Qwen2ForCausalLM", "Qwen3ForCausalLM"} & set(archs):
        slides = cfg.get("use_sliding_window") and cfg.get("max_window_layers", 0) < cfg.get("num_hidden_layers", 0)
        return window if slides else None
    return window
