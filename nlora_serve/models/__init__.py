"""Base models: resolve, convert the embedded default, load weights by name, fingerprint.

The ground floor that ``adapters``, ``engine`` and ``serving`` build on::

    resolve.py   --model default | DIR | FILE.gguf -> a prepared local directory (the default
                 converted once, by gguf_convert.py in a child process); hub.py: ORG/NAME found in
                 the Hugging Face cache; cache.py: where prepared models live
    base.py      BaseModel: the loaded model (directory, spec, weights by name, tokenizer)
    spec.py      ModelSpec: the shapes the rest of the code needs, from config.json
    weights.py   weights by module name (safetensors only) and the base fingerprint
    dtype.py     --dtype auto | float32 | bfloat16; dummy.py: random weights (--load-format dummy)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module that defines it, imported on first use (PEP 562): what needs no torch (cache.py,
# hub.py, spec.py, resolve.py's look-ups) loads none, so `models list` and a --model that does not
# exist answer in a fraction of a second instead of after torch's import (1.4 s)
_EXPORTS = {"BaseModel": "base", "load_base": "base", "load_hf_model": "base", "cache_root": "cache",
            "resolve_dtype": "dtype", "DEFAULT_MODEL": "resolve", "list_prepared": "resolve",
            "resolve_model": "resolve", "PROJECTIONS": "spec", "ModelSpec": "spec", "read_spec": "spec",
            "fingerprint": "weights", "load_weights": "weights"}

__all__ = [
    "DEFAULT_MODEL", "PROJECTIONS", "BaseModel", "ModelSpec", "cache_root", "fingerprint",
    "list_prepared", "load_base", "load_hf_model", "load_weights", "read_spec", "resolve_dtype",
    "resolve_model",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


if TYPE_CHECKING:
    from nlora_serve.models.base import BaseModel, load_base, load_hf_model
    from nlora_serve.models.cache import cache_root
    from nlora_serve.models.dtype import resolve_dtype
    from nlora_serve.models.resolve import DEFAULT_MODEL, list_prepared, resolve_model
    from nlora_serve.models.spec import PROJECTIONS, ModelSpec, read_spec
    from nlora_serve.models.weights import fingerprint, load_weights
