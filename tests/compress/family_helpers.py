"""Helpers for the family tests: random PEFT LoRA folders and float64 references read straight
from the files (safetensors only, none of our readers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODULE_PATH = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def key(layer: int, module: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{MODULE_PATH[module]}.{module}.{part}"


def write_lora(out: Path, spec, seed: int, r: int = 4, alpha: float = 8.0,
               modules=("q_proj", "v_proj", "down_proj"), scale: float = 0.02) -> Path:
    """A PEFT-layout LoRA folder with random A and B (B nonzero, so it changes outputs)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for m in modules:
            o, i = spec.projection_shape(m)
            tensors[key(layer, m, "lora_A.weight")] = scale * torch.randn(r, i, generator=gen)
            tensors[key(layer, m, "lora_B.weight")] = scale * torch.randn(o, r, generator=gen)
    out.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": list(modules),
           "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def family_deltas(family_dir: Path, member: str) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> B_f @ N @ A_f [out, in] float64, from the member's files and the family
    file it names (the config's r = lora_alpha, so s = 1: asserted)."""
    cfg = json.loads((family_dir / member / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and cfg["nlora_serve"]["format"] == "family-n"
    factors = load_file(str(family_dir / "_families" / cfg["nlora_serve"]["family"] / "family.safetensors"))
    ns = load_file(str(family_dir / member / "adapter_model.safetensors"))
    out = {}
    for k, n in ns.items():
        prefix = k[: -len("lora_N.weight")]
        parts = prefix.split(".")
        layer, module = int(parts[4]), parts[6]
        a, b = factors[prefix + "lora_A.weight"].double(), factors[prefix + "lora_B.weight"].double()
        out[(layer, module)] = b @ n.double() @ a
    return out


def lora_deltas(lora_dir: Path) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> s · B @ A float64 of a plain PEFT LoRA folder."""
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    t = load_file(str(lora_dir / "adapter_model.safetensors"))
    out = {}
    for k, a in t.items():
        if k.endswith("lora_A.weight"):
            parts = k.split(".")
            b = t[k.replace("lora_A", "lora_B")]
            out[(int(parts[4]), parts[6])] = s * b.double() @ a.double()
    return out
