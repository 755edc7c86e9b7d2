"""A tiny random Llama, PEFT-style adapters for it, and the transformers reference on merged weights.

Used by the tests of the engine's CUDA path (run on CPU tensors under the Triton interpreter) and
by bench/gpu_engine_check.py on a GPU. The reference is independent of our code: transformers'
LlamaForCausalLM with every adapter folded into its weights in float64 (W + s·B·N·A).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import safetensors.torch
import torch

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny_llama(out: Path, *, vocab_size: int = 49152, hidden: int = 96, layers: int = 2, heads: int = 6,
                    kv_heads: int = 2, head_dim: int = 32, intermediate: int = 128, seed: int = 0,
                    init_std: float = 0.08, dtype: torch.dtype = torch.float32):
    """Save a random LlamaForCausalLM (safetensors) to ``out``; returns the transformers model.

    ``heads / kv_heads`` query heads share each KV head (3 by default, as in SmolLM2). A larger
    ``init_std`` than transformers' 0.02 keeps the greedy margins of random weights away from ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         initializer_range=init_std, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


# a tiny Qwen3: head_dim 32, not hidden / heads = 16, so a head_dim taken from the shape shows (a multiple
# of 32, as the native layer ops take)
QWEN3_SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                   initializer_range=0.08, bos_token_id=1, eos_token_id=2)


def make_tiny_qwen3(out: Path, *, tie: bool = True):
    """Save a random Qwen3ForCausalLM (safetensors, :data:`QWEN3_SMALL`) to ``out``; returns the
    transformers model. Its q/k head-norm weights are drawn in [0.3, 2] (transformers starts them at
    1), so a norm missing or q's and k's swapped changes the logits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_SMALL, tie_word_embeddings=tie)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.3, 2.0)
    model.save_pretrained(out, safe_serialization=True)
    return model


def module_path(layer: int, module: str) -> str:
    block = "self_attn" if module in MODULES[:4] else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


def write_peft(out: Path, factors: dict[tuple[int, str], dict[str, torch.Tensor]], *, rank: int,
               alpha: float) -> Path:
    """A PEFT-style adapter folder: ``factors[(layer, module)]`` holds "A" [r, in], "B" [out, r] and
    optionally "N" [r, r] (NLoRA; plain LoRA without it)."""
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({m for _, m in factors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "init_lora_weights": True}
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = {f"base_model.model.{module_path(*site)}.lora_{k}.weight": v.contiguous()
               for site, parts in factors.items() for k, v in parts.items()}
    safetensors.torch.save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def random_factors(model, *, rank: int, with_n: bool, seed: int, scale: float = 0.3,
                   tied: bool = False, n_scale: float | None = None) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Factors (float32, on the CPU) on every projection of every layer: random A, B (and N), or,
    with ``tied``, the Nyström slices A = W[:r, :], B = W[:, :r] and a random N (an IntTune tenant).
    N ~ N(0, n_scale²): by default 3 for tied tenants (their B and A are as small as W), else 1."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(model.config.num_hidden_layers):
        for module in MODULES:
            w = model.get_submodule(module_path(layer, module)).weight.detach().float().cpu()
            out, inp = w.shape
            if tied:
                parts = {"A": w[:rank, :].clone(), "B": w[:, :rank].clone()}
            else:
                parts = {"A": torch.randn(rank, inp, generator=gen) * scale,
                         "B": torch.randn(out, rank, generator=gen) * scale}
            if with_n or tied:
                parts["N"] = torch.randn(rank, rank, generator=gen) * (n_scale or (3.0 if tied else 1.0))
            factors[(layer, module)] = parts
    return factors


def merged(model, factors, *, rank: int, alpha: float):
    """A deep copy of ``model`` with W += (alpha / r)·B·N·A at every site, folded in float64."""
    merged_model = copy.deepcopy(model)
    scaling = alpha / rank
    with torch.no_grad():
        for site, parts in factors.items():
            lin = merged_model.get_submodule(module_path(*site))
            a, b = parts["A"].double(), parts["B"].double()
            n = parts["N"].double() if "N" in parts else torch.eye(rank, dtype=torch.float64)
            delta = (scaling * b @ n @ a).to(lin.weight.device)
            lin.weight.copy_((lin.weight.double() + delta).to(lin.weight.dtype))
    return merged_model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (EOS not special) and the top-2 logit margin at every step."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    margins = []
    for logits in out.scores:  # after the processors: EOS is -inf before min_new_tokens, as ours
        top2 = logits[0].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
    return tokens, margins


# the graph tests' tenants: two tied (one pool that grows), LoRA on attention only and NLoRA on
# everything (so its MLP tables are allocated after the attention-only tenant's graphs were captured)
GRAPH_TENANTS = {"tied": dict(tied=True, with_n=True, seed=1), "tied2": dict(tied=True, with_n=True, seed=4),
                 "lora_attn": dict(with_n=False, seed=3), "lora_all": dict(with_n=True, seed=2)}


def graph_tenants(root: Path, rank: int, alpha: float):
    """The tiny model under ``root / "model"`` and :data:`GRAPH_TENANTS` written as PEFT folders.
    Returns (model folder, transformers model, {name: (adapter folder, merged reference model)})."""
    model = make_tiny_llama(root / "model")
    tenants = {}
    for name, kind in GRAPH_TENANTS.items():
        factors = random_factors(model, rank=rank, **kind)
        if name == "lora_attn":
            factors = {k: v for k, v in factors.items() if k[1] in ("q_proj", "v_proj", "o_proj")}
        tenants[name] = (write_peft(root / name, factors, rank=rank, alpha=alpha),
                         merged(model, factors, rank=rank, alpha=alpha))
    return root / "model", model, tenants
