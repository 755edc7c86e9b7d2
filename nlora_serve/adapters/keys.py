"""Tensor key names of PEFT / NLoRA adapter files and their mapping to (layer, module, part).

Layout (PEFT ``save_pretrained`` and the NLoRA reference code)::

    base_model.model.model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.lora_{A,N,B}.weight
    base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.bias            (lora_bias)
"""

from __future__ import annotations

import re

from nlora_serve.errors import AdapterError
from nlora_serve.models.spec import PROJECTIONS, ModelSpec

PREFIX = "base_model.model."
PART_A, PART_N, PART_B, PART_BIAS = "lora_A.weight", "lora_N.weight", "lora_B.weight", "lora_B.bias"
EXPECTED_LAYOUT = (f"{PREFIX}model.layers.{{i}}.{{self_attn|mlp}}.{{q,k,v,o,gate,up,down}}_proj."
                   "lora_{A,N,B}.weight")
_KEY_RE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
                     r"(lora_A\.weight|lora_N\.weight|lora_B\.weight|lora_B\.bias)")


def tensor_key(layer: int, module: str, part: str) -> str:
    """The file key of one tensor, e.g. ``tensor_key(3, "q_proj", "lora_N.weight")``."""
    return f"{PREFIX}{ModelSpec.module_path(layer, module)}.{part}"


def _why_unmapped(key: str, spec: ModelSpec) -> str:
    """A person-readable reason why ``key`` names no adaptable module of this model."""
    if "lora_magnitude_vector" in key:
        return "it is a DoRA lora_magnitude_vector; DoRA is not served"
    if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
        return "LoRA on the embeddings or lm_head is not served"
    m = _KEY_RE.fullmatch(key)
    if m is None:
        return f"it does not follow the layout {EXPECTED_LAYOUT}"
    layer, block, module = int(m.group(1)), m.group(2), m.group(3)
    if m.group(1) != str(layer):
        return (f"its layer index {m.group(1)!r} is not written as PEFT writes it ({str(layer)!r}): two keys "
                "could name one module")
    if layer >= spec.num_layers:
        return f"layer {layer} is out of range: the model has {spec.num_layers} layers (0-{spec.num_layers - 1})"
    if module not in PROJECTIONS:
        return f"{module!r} is not one of the projections {', '.join(PROJECTIONS)}"
    return f"{module} is not under {block} in this model"


def parse_key(key: str, spec: ModelSpec) -> tuple[int, str, str] | None:
    """``(layer, module, part)`` for a key of this model's layout, else None."""
    m = _KEY_RE.fullmatch(key)
    if m is None:
        return None
    layer, module, part = int(m.group(1)), m.group(3), m.group(4)
    if layer >= spec.num_layers or module not in PROJECTIONS:
        return None
    # one spelling, PEFT's: not "layers.00" or a non-ASCII digit (int() reads both as 0), nor a module under
    # the other block
    if key != tensor_key(layer, module, part):
        return None
    return layer, module, part


def _common_prefix(keys: list[str]) -> str:
    first, last = min(keys), max(keys)
    n = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    return first[:n]


def group_keys(keys: list[str], spec: ModelSpec) -> dict[tuple[int, str], dict[str, str]]:
    """Group file keys by site: ``{(layer, module): {part: key}}``.

    Raises:
        AdapterError: no key matches a module of this model (names the common prefix and the
            expected layout), or one key does not (names the key and why).
    """
    if not keys:
        raise AdapterError("adapter_model.safetensors holds no tensors: the adapter would adapt nothing")
    parsed = {k: parse_key(k, spec) for k in keys}
    unmapped = sorted(k for k, p in parsed.items() if p is None)
    if len(unmapped) == len(keys):
        raise AdapterError(
            f"none of the {len(keys)} tensor keys matches a module of this model: common prefix "
            f"{_common_prefix(unmapped)!r} (e.g. {unmapped[0]!r}), expected {EXPECTED_LAYOUT}; "
            "the adapter would adapt nothing")
    if unmapped:
        raise AdapterError(f"tensor {unmapped[0]!r} maps to no adaptable module of this model: "
                           f"{_why_unmapped(unmapped[0], spec)} ({len(unmapped)} such keys)")
    sites: dict[tuple[int, str], dict[str, str]] = {}
    for key, (layer, module, part) in parsed.items():
        sites.setdefault((layer, module), {})[part] = key
    return sites
