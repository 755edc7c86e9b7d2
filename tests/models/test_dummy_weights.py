"""``--load-format dummy``: random weights from config.json alone, checked against transformers:
every parameter of the architecture present with its shape, and our forward on them equal to
transformers' forward on the same tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nlora_serve.errors import ModelError
from nlora_serve.models import load_base

BENCH_MODELS = Path(__file__).parents[2] / "bench" / "models"


def _tiny_config(tmp_path: Path) -> Path:
    cfg = json.loads((BENCH_MODELS / "smollm2-135m" / "config.json").read_text())
    cfg.update(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, initializer_range=0.2)
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(BENCH_MODELS / "smollm2-135m" / name, model / name)
    return model


def test_dummy_weights_cover_every_parameter_of_the_architecture(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = _tiny_config(tmp_path)
    base = load_base(str(model_dir), torch.float32, load_format="dummy")
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert {k: tuple(v.shape) for k, v in base.weights.items()} == expected
    again = load_base(str(model_dir), torch.float32, load_format="dummy")
    assert all(torch.equal(base.weights[k], again.weights[k]) for k in expected)  # seeded
    assert base.fingerprint == again.fingerprint and len(base.fingerprint) == 64


def test_dummy_weights_in_bf16_are_the_fp32_ones_rounded(tmp_path):
    # vocab 1001 x hidden 72: an embedding whose size is no multiple of 16 (torch 2.13's CPU bf16
    # draw differs from its fp32 draw in such a tensor's last 16 values; torch 2.11's in all of them)
    model_dir = _tiny_config(tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(vocab_size=1001, hidden_size=72, head_dim=18)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    fp32 = load_base(str(model_dir), torch.float32, load_format="dummy").weights
    bf16 = load_base(str(model_dir), torch.bfloat16, load_format="dummy").weights
    assert fp32.keys() == bf16.keys() and fp32["model.embed_tokens.weight"].numel() % 16
    for name, w in fp32.items():
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], w.to(torch.bfloat16)), name


def test_our_forward_on_dummy_weights_equals_transformers(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.engine.sample.sampling import SamplingParams

    model_dir = _tiny_config(tmp_path)
    config = EngineConfig(model=str(model_dir), load_format="dummy", device="cpu",
                          scheduler=SchedulerConfig(max_num_seqs=2, max_model_len=64),
                          cache=CacheConfig(num_blocks=16))
    prompt = list(range(10, 30))
    with LLMEngine(config) as engine:
        out = engine.generate([prompt], SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0, logprobs=0))[0]
        weights = engine.core.runner.model.embed  # the placed embedding equals the drawn one
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).eval()
    missing, unexpected = hf.load_state_dict(load_base(str(model_dir), torch.float32, load_format="dummy").weights,
                                             strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    assert torch.equal(hf.model.embed_tokens.weight, weights)
    with torch.no_grad():
        ids = torch.tensor([prompt + out.token_ids])
        logp = hf(ids).logits[0].float().log_softmax(-1)
    want = ids[0, len(prompt):]
    assert logp[len(prompt) - 1:-1].argmax(-1).tolist() == want.tolist()  # greedy: each was HF's argmax
    ours = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
    theirs = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), want]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_dummy_without_a_tokenizer_says_which_flag_to_pass(tmp_path):
    model = tmp_path / "bare"
    model.mkdir()
    shutil.copy(BENCH_MODELS / "llama-8b" / "config.json", model / "config.json")
    with pytest.raises(ModelError, match="--tokenizer"):
        load_base(str(model), torch.bfloat16, load_format="dummy")


def test_the_bench_llama_8b_config_has_llama_3_8b_shapes():
    from nlora_serve.models import read_spec

    spec = read_spec(BENCH_MODELS / "llama-8b")
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.vocab_size) == (4096, 14336, 32, 32, 8, 128, 128256)
