"""Llama-family config variants against transformers: projection biases beyond Qwen2's q/k/v (Llama's
``attention_bias`` puts one on o_proj too, ``mlp_bias`` on gate/up/down), with tied and untied
adapters, and sliding-window attention, which the engine does not run (it refuses a max_model_len
the window would cut)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from greedy_rule import matches_reference
from tiny_llama import hf_greedy, merged, random_factors, write_peft
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.errors import ModelError
from nlora_serve.models.base import check_max_len, sliding_window
from nlora_serve.models.spec import read_spec

RANK, ALPHA, NEW_TOKENS = 4, 8.0, 4
SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.08,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def _save(folder, model_class, config_class, **extra):
    torch.manual_seed(0)
    model = model_class(config_class(**{**SMALL, **extra})).float().eval()
    with torch.no_grad():  # transformers starts biases at zero: give them weight
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _config(model_dir, tokenizer_dir, store):
    return EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu", adapter_dir=str(store),
                        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64),
                        cache=CacheConfig(block_size=8, num_blocks=32))


def test_llama_attention_and_mlp_biases_with_tied_and_untied_adapters_equal_transformers(tmp_path, base_model_dir):
    # the engine loaded only q/k/v biases: o_proj's and the MLP's were dropped (greedy tokens off
    # from the first one), and a tied tenant's z would have kept the MLP bias slice
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _save(tmp_path / "model", LlamaForCausalLM, LlamaConfig, attention_bias=True, mlp_bias=True)
    refs = {None: model}
    for name, kind in {"tied": dict(tied=True, with_n=True, seed=1), "nlora": dict(with_n=True, seed=2)}.items():
        factors = random_factors(model, rank=RANK, **kind)
        write_peft(tmp_path / name, factors, rank=RANK, alpha=ALPHA)
        refs[name] = merged(model, factors, rank=RANK, alpha=ALPHA)
    gen = torch.Generator().manual_seed(3)
    jobs = [(name, torch.randint(3, 49152, (length,), generator=gen).tolist())
            for name, length in ((None, 5), ("tied", 19), ("nlora", 12))]
    with LLMEngine(_config(tmp_path / "model", base_model_dir, tmp_path / "store")) as engine:
        for name in ("tied", "nlora"):
            engine.adapters.register_dir(name, tmp_path / name)
        outs = engine.generate([p for _, p in jobs], SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                                                                   temperature=0.0), [n for n, _ in jobs])
    for (name, prompt), out in zip(jobs, outs):
        want, margins = hf_greedy(refs[name], prompt, NEW_TOKENS)
        assert matches_reference(out.token_ids, want, margins), (name, out.token_ids, want)


CONFIGS = {  # config.json fields -> the window the model slides (None: full attention everywhere)
    "mistral": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16}, 16),
    "mistral-null": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None}, None),
    "qwen2-off": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 16,
                   "use_sliding_window": False, "max_window_layers": 0, "num_hidden_layers": 2}, None),
    "qwen2-on": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 16,
                  "use_sliding_window": True, "max_window_layers": 1, "num_hidden_layers": 2}, 16),
    "qwen2-all-full": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 16,
                        "use_sliding_window": True, "max_window_layers": 2, "num_hidden_layers": 2}, None),
    "layer-types": ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 16,
                     "layer_types": ["full_attention", "sliding_attention"]}, 16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_sliding_window_shorter_than_max_model_len_is_refused(tmp_path, name):
    # the engine attends to the whole context: past the window its tokens differed from transformers'
    # (a Mistral with sliding_window 8 diverged at the 9th position); within it both are the same
    cfg, window = CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 256}))
    base = SimpleNamespace(path=tmp_path)
    assert sliding_window(cfg) == window
    check_max_len(base, 16)
    if window is None:
        check_max_len(base, 128)
    else:
        with pytest.raises(ValueError, match=r"max_model_len=128 exceeds the model's sliding_window 16"):
            check_max_len(base, 128)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_an_mlp_activation_other_than_silu_is_refused(tmp_path, act):
    # the engine's MLP is SiLU-gated whatever the config said: a Llama with hidden_act "gelu" gave
    # other tokens than transformers from the second one
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_act": act, "num_attention_heads": 4, "num_hidden_layers": 2,
           "hidden_size": 64, "intermediate_size": 96, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=f"hidden_act '{act}' is not supported"):
        read_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "silu"}))
    assert read_spec(tmp_path).num_layers == 2
