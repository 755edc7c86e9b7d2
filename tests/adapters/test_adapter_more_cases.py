"""Further kinds of input, generated here: knobs PEFT accepts (accepted, with the right numbers)
and damage that must be refused with the key or field and the numbers in the message."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_helpers import file_deltas, lora_config, max_rel_err, write_raw_adapter

from nlora_serve.adapters.loader import read_adapter
from nlora_serve.errors import AdapterError
from nlora_serve.models.spec import PROJECTIONS, ModelSpec

P = "base_model.model.model.layers"  # key prefix of the default model's layers


def _pair(layer: int, module: str, r: int = 4, dtype=torch.float32, seed: int = 0) -> dict:
    """lora_A / lora_B for one projection of the default model (small random values)."""
    g = torch.Generator().manual_seed(seed * 100 + layer)
    out, inp = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}[module]
    prefix = ModelSpec.module_path(layer, module)
    return {f"base_model.model.{prefix}.lora_A.weight": (0.05 * torch.randn(r, inp, generator=g)).to(dtype),
            f"base_model.model.{prefix}.lora_B.weight": (0.05 * torch.randn(out, r, generator=g)).to(dtype)}


def _lora(layers=(0, 1), modules=("q_proj", "v_proj"), **kw) -> dict:
    out = {}
    for layer in layers:
        for m in modules:
            out.update(_pair(layer, m, **kw))
    return out


def _adapter(tmp_path, config: dict, tensors: dict):
    return write_raw_adapter(tmp_path / "a", config, tensors)


def test_rank_and_alpha_patterns_follow_peft(base_fp32, tmp_path):
    tensors = _lora(layers=(0, 1), modules=("q_proj",))
    tensors.update(_pair(0, "v_proj", r=2))
    tensors.update(_pair(1, "v_proj", r=2))
    cfg = lora_config(layers_to_transform=[0, 1], rank_pattern={"v_proj": 2},
                      alpha_pattern={"layers.1.self_attn.q_proj": 32})
    a = read_adapter(_adapter(tmp_path, cfg, tensors), base_fp32)
    got = {k: (s.rank, s.scaling) for k, s in a.sites.items()}
    assert got == {(0, "q_proj"): (4, 2.0), (0, "v_proj"): (2, 4.0), (1, "q_proj"): (4, 8.0), (1, "v_proj"): (2, 4.0)}


def test_exclude_modules_and_negative_alpha(base_fp32, tmp_path):
    cfg = lora_config(lora_alpha=-2, layers_to_transform=[0, 1], exclude_modules=["model.layers.0.self_attn.q_proj"])
    tensors = {k: v for k, v in _lora().items() if ".0.self_attn.q_proj." not in k}
    a = read_adapter(_adapter(tmp_path, cfg, tensors), base_fp32)
    assert set(a.sites) == {(0, "v_proj"), (1, "q_proj"), (1, "v_proj")}
    assert {s.scaling for s in a.sites.values()} == {-0.5}


def test_bf16_tensors_are_cast_once_to_the_compute_dtype_exactly(base_fp32, tmp_path):
    path = _adapter(tmp_path, lora_config(layers_to_transform=[0, 1]), _lora(dtype=torch.bfloat16))
    a = read_adapter(path, base_fp32)
    assert a.stored_dtype == torch.bfloat16 and all(s.A.dtype == torch.float32 for s in a.sites.values())
    ref, _ = file_deltas(path)
    for (layer, module), s in a.sites.items():
        assert max_rel_err(s.delta(), ref[ModelSpec.module_path(layer, module)]) < 1e-12


def test_all_linear_targets_every_projection_but_never_lm_head(base_fp32, tmp_path):
    tensors = {}
    for layer in range(30):
        for module in PROJECTIONS:
            tensors.update(_pair(layer, module, r=1))
    cfg = lora_config(r=1, target_modules="all-linear")
    assert len(read_adapter(_adapter(tmp_path, cfg, tensors), base_fp32).sites) == 210
    partial = {k: v for k, v in tensors.items() if ".o_proj." not in k}
    with pytest.raises(AdapterError, match=r"targets model\.layers\.0\.self_attn\.o_proj but the weights hold no"):
        read_adapter(write_raw_adapter(tmp_path / "b", cfg, partial), base_fp32)


def _bias(layer: int, module: str, out: int = 576) -> dict:
    return {f"{P}.{layer}.self_attn.{module}.lora_B.bias": torch.full((out,), 0.01)}


def _one(**kw) -> tuple[dict, dict]:
    return lora_config(target_modules=["q_proj"], layers_to_transform=[0], **kw), _pair(0, "q_proj")


def _drop(t: dict, suffix: str) -> dict:
    return {k: v for k, v in t.items() if not k.endswith(suffix)}


REFUSED = {
    "lora-bias-missing": (lambda: (_one(lora_bias=True)), r"needs lora_B\.bias \(lora_bias=true\)"),
    "bias-without-lora-bias": (lambda: (_one()[0], {**_one()[1], **_bias(0, "q_proj")}), "lora_bias=false"),
    "a-without-b": (lambda: (_one()[0], _drop(_one()[1], "lora_B.weight")), r"needs lora_B\.weight"),
    "b-without-a": (lambda: (_one()[0], _drop(_one()[1], "lora_A.weight")), r"needs lora_A\.weight"),
    "unknown-part": (lambda: (_one()[0], {**_one()[1], f"{P}.0.self_attn.q_proj.lora_C.weight": torch.ones(4, 4)}),
                     r"lora_C\.weight' maps to no adaptable module"),
    "embedding-lora": (lambda: (_one()[0], {**_one()[1], "base_model.model.model.embed_tokens.lora_embedding_A":
                                            torch.ones(4, 49152)}), "embeddings or lm_head"),
    "layer-out-of-range": (lambda: (_one()[0], {**_one()[1], **_pair(30, "q_proj")}), "layer 30 is out of range"),
    "module-under-wrong-block": (lambda: (_one()[0], {**_one()[1],
                                                      f"{P}.0.mlp.q_proj.lora_A.weight": torch.ones(4, 576)}),
                                 "not under mlp"),
    "untargeted-module": (lambda: (_one()[0], {**_one()[1], **_pair(0, "k_proj")}), "does not target"),
    # h130: a typo'd entry beside a good one, as a hand-edited PEFT config has it
    "typo-in-targets": (lambda: (lora_config(target_modules=["v_proj", "q_prj"]), {**_pair(0, "q_proj"),
                                                                               **_pair(0, "v_proj")}),
                        r"does not target .*; target_modules 'q_prj' names no projection of this model \(q_proj, "
                        r"k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj\)$"),
    "config-rank-disagrees": (lambda: (_one(r=8)[0], _one()[1]), r"shape \[4, 576\], expected \[8, 576\]"),
    "rank-at-max-plus-one": (lambda: (_one(r=65)[0], _pair(0, "q_proj", r=65)), "rank 65 .* max rank 64"),
    "int-tensor": (lambda: (_one()[0], {**_one()[1], f"{P}.0.self_attn.q_proj.lora_A.weight":
                                        torch.ones(4, 576, dtype=torch.int32)}), "dtype I32"),
    "inf-in-fp16": (lambda: (_one()[0], {k: v.half().masked_fill(torch.rand(v.shape) < 0.01, float("inf"))
                                         for k, v in _one()[1].items()}), "non-finite"),
    "no-tensors": (lambda: (_one()[0], {}), "holds no tensors"),
    "targets-nothing": (lambda: (lora_config(target_modules=["nonexistent_proj"]), _pair(0, "q_proj")),
                        "selects no module"),
    "lm-head-target": (lambda: (lora_config(target_modules=["q_proj", "lm_head"]), _pair(0, "q_proj")),
                       "lm_head"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_kinds(kind, base_fp32, tmp_path):
    make, words = REFUSED[kind]
    cfg, tensors = make()
    path = _adapter(tmp_path, cfg, tensors)
    with pytest.raises(AdapterError, match=words):
        read_adapter(path, base_fp32)


def test_rank_at_max_is_accepted(base_fp32, tmp_path):
    cfg = lora_config(r=64, target_modules=["q_proj"], layers_to_transform=[0])
    assert read_adapter(_adapter(tmp_path, cfg, _pair(0, "q_proj", r=64)), base_fp32).ranks == [64]


@pytest.mark.parametrize("setup,words", [
    (lambda p: None, "no such adapter directory"),
    (lambda p: (p.mkdir(), (p / "adapter_config.json").write_text("{not json")), r"adapter_config.json: not valid JSON"),
    (lambda p: (p.mkdir(), (p / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)),
     r"adapter_config.json: not valid JSON"),  # nested past the parser: not a RecursionError
    (lambda p: (p.mkdir(), (p / "adapter_config.json").write_text(json.dumps(lora_config()))), "no adapter_model.safetensors"),
    (lambda p: (p.mkdir(), (p / "adapter_config.json").write_text(json.dumps(lora_config())),
                (p / "adapter_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"garbage!")),
     "not a readable safetensors"),
    (lambda p: (p.mkdir(), (p / "adapter_config.json").write_text(json.dumps(lora_config())),
                (p / "adapter_model.pt").write_bytes(b"\x80\x04")), r"adapter_model\.pt \(a pickle"),
])
def test_broken_directories_are_refused(base_fp32, tmp_path, setup, words):
    setup(tmp_path / "x")
    with pytest.raises(AdapterError, match=words):
        read_adapter(tmp_path / "x", base_fp32)


@pytest.mark.parametrize("alpha, pattern, refused", [(0, {}, True), (0.0, {"v_proj": 0}, True),
                                                     (0, {"v_proj": 16}, False), (8, {"v_proj": 0}, False)])
def test_an_alpha_that_zeroes_every_site_is_refused_naming_lora_alpha(base_fp32, tmp_path, alpha, pattern, refused):
    """lora_alpha 0 made every site's scaling 0: the adapter answered as the base model, whatever its
    weights, and a weights swap keeps the config (s30). Refused, naming lora_alpha; an alpha_pattern
    that leaves one module adapting, or one module's alpha 0 among others, is accepted as PEFT does."""
    cfg = lora_config(lora_alpha=alpha, layers_to_transform=[0, 1], alpha_pattern=pattern)
    if refused:
        with pytest.raises(AdapterError, match=r"lora_alpha = 0(\.0)?( and every alpha_pattern value .*)? make the "
                                               r"LoRA scaling \(alpha / r\) 0 at all 4 adapted modules"):
            read_adapter(_adapter(tmp_path, cfg, _lora()), base_fp32)
    else:
        a = read_adapter(_adapter(tmp_path, cfg, _lora()), base_fp32)
        # by hand: alpha / r with r = 4, v_proj's alpha from the pattern
        v, q = pattern["v_proj"] / 4, alpha / 4
        assert {k: s.scaling for k, s in a.sites.items()} == {(0, "q_proj"): q, (0, "v_proj"): v,
                                                              (1, "q_proj"): q, (1, "v_proj"): v}


def test_an_untrained_adapter_b_zero_is_accepted_as_peft_inits_it(base_fp32, tmp_path):
    # B = 0 (PEFT's default init, `adapters init`): kept on purpose, a weights swap makes it adapt
    tensors = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in _lora().items()}
    a = read_adapter(_adapter(tmp_path, lora_config(layers_to_transform=[0, 1]), tensors), base_fp32)
    assert {s.scaling for s in a.sites.values()} == {2.0}
