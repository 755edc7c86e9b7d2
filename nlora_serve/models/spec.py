"""What the rest of the code needs to know about a base model, read from its ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.errors import ModelError

# Llama-family causal LMs share module names and the decoder layer structure; Qwen3 (dense) adds a
# per-head RMSNorm on q and k (``ModelSpec.qk_norm``). Qwen3-MoE (Qwen3MoeForCausalLM) is not one.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# architectures whose attention RMS-normalises each q and k head (weights ``self_attn.q_norm`` and
# ``self_attn.k_norm``, [head_dim]) after the projection and before RoPE
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM",)

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
# The seven adaptable projections of one decoder layer, in forward order.
PROJECTIONS = ATTN_MODULES + MLP_MODULES
Site = tuple[int, str]  # (layer, module): one adapted projection of the model


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shapes and names of a Llama-family base model.

    All sizes are element counts; ``projection_shape`` gives nn.Linear's ``[out, in]``.
    """

    architecture: str  # e.g. "LlamaForCausalLM"
    num_layers: int  # decoder layers (config ``num_hidden_layers``)
    hidden_size: int  # width of the residual stream and the embeddings, elements
    intermediate_size: int  # the MLP's inner width: gate_proj / up_proj out, down_proj in
    num_heads: int  # query heads (``num_attention_heads``)
    num_kv_heads: int  # key/value heads (``num_key_value_heads``; = num_heads without it)
    head_dim: int  # elements per head (config ``head_dim``, else hidden_size // num_heads)
    vocab_size: int  # token ids 0 .. vocab_size − 1: rows of the embedding (and lm_head)
    attention_bias: bool  # q/k/v carry a bias (Qwen2)
    tie_word_embeddings: bool  # lm_head reuses the embedding matrix (SmolLM2)
    qk_norm: bool = False  # each q and k head is RMS-normalised before RoPE (Qwen3)

    def projection_shape(self, module: str) -> tuple[int, int]:
        """``(out_features, in_features)`` of one projection.

        Raises:
            KeyError: ``module`` is not one of :data:`PROJECTIONS`.
        """
        h, q, kv, i = (self.hidden_size, self.num_heads * self.head_dim,
                       self.num_kv_heads * self.head_dim, self.intermediate_size)
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                  "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        return shapes[module]

    @staticmethod
    def module_path(layer: int, module: str) -> str:
        """Dotted name of a projection inside the HF model, e.g. ``model.layers.3.self_attn.q_proj``."""
        block = "self_attn" if module in ATTN_MODULES else "mlp"
        return f"model.layers.{layer}.{block}.{module}"

    @staticmethod
    def qk_norm_paths(layer: int) -> tuple[str, str]:
        """Weight names of one layer's q and k head norms (Qwen3), each ``[head_dim]``."""
        return (f"model.layers.{layer}.self_attn.q_norm.weight", f"model.layers.{layer}.self_attn.k_norm.weight")


def read_spec(model_dir: Path) -> ModelSpec:
    """Read and check ``model_dir/config.json``.

    Raises:
        ModelError: the file is missing or unreadable, the architecture is not one of
            :data:`SUPPORTED_ARCHITECTURES` (Qwen3-MoE is refused with the others), or its MLP's
            activation (``hidden_act``) is not SiLU, the only one the engine runs.
    """
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no config.json; expected a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read config.json as JSON ({exc})") from None
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelError(f"{path}: architecture {archs or cfg.get('model_type')!r} is not supported; "
                         f"expected one of {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN: "swish" is SiLU too
        raise ModelError(f"{path}: hidden_act {act!r} is not supported: the engine's MLP is SiLU-gated "
                         "(hidden_act 'silu'), as Llama, Mistral, Qwen2 and Qwen3 ship")
    try:
        heads = cfg["num_attention_heads"]
        return ModelSpec(
            architecture=arch,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=arch in QK_NORM_ARCHITECTURES,
        )
    except KeyError as exc:
        raise ModelError(f"{path}: config.json lacks the field {exc.args[0]!r}") from None
