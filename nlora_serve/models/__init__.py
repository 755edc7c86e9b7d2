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

from nlora_serve.models.base import BaseModel, load_base, load_hf_model
from nlora_serve.models.cache import cache_root
from nlora_serve.models.dtype import resolve_dtype
from nlora_serve.models.resolve import DEFAULT_MODEL, list_prepared, resolve_model
from nlora_serve.models.spec import PROJECTIONS, ModelSpec, read_spec
from nlora_serve.models.weights import fingerprint, load_weights

__all__ = [
    "DEFAULT_MODEL", "PROJECTIONS", "BaseModel", "ModelSpec", "cache_root", "fingerprint",
    "list_prepared", "load_base", "load_hf_model", "load_weights", "read_spec", "resolve_dtype",
    "resolve_model",
]
