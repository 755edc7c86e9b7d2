"""Our RoPE tables against transformers' LlamaRotaryEmbedding (default, linear, llama3)."""

from __future__ import annotations

import json

import pytest
import torch

from nlora_serve.engine.model.rope import rope_config, rope_tables
from nlora_serve.errors import ModelError

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    LLAMA3,
])
def test_tables_equal_transformers(tmp_path, rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, max_position_embeddings=32768,
                      rope_parameters=dict(rope))
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    params, _ = rope_config(tmp_path / "config.json")
    assert params["rope_type"] == rope["rope_type"]
    positions = torch.tensor([[0, 1, 7, 100, 4095, 8191, 8192, 20000]])
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_tables(128, 20001, params)
    half = 64
    torch.testing.assert_close(cos[positions[0]], hf_cos[0], rtol=1e-5, atol=1e-5)
    # ours carries sin's first half negated (see rope_tables); transformers negates in rotate_half
    torch.testing.assert_close(sin[positions[0], half:], hf_sin[0, :, half:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-sin[positions[0], :half], hf_sin[0, :, :half], rtol=1e-5, atol=1e-5)


def test_llama3_without_its_fields_names_them(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(ModelError, match="lack low_freq_factor, high_freq_factor, original_max_position_embeddings"):
        rope_config(tmp_path / "config.json")


def test_unsupported_rope_type_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"rope_scaling": {"type": "yarn", "factor": 4.0}}))
    with pytest.raises(ModelError, match="rope_type 'yarn' is not supported"):
        rope_config(tmp_path / "config.json")
