"""Nyström init, tied detection, the compact tied form, and the write → read round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nlora_serve.adapters.loader import read_adapter
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.save import write_adapter
from nlora_serve.errors import AdapterError

R, TARGETS, LAYERS = 4, ["q_proj", "v_proj", "down_proj"], [0, 7]


@pytest.fixture(scope="module")
def nlora(base_fp32):
    return init_adapter(base_fp32, rank=R, targets=TARGETS, layers=LAYERS, alpha=8)


def test_nlora_init_is_the_reference_slices_of_w(nlora, base_fp32):
    assert set(nlora.sites) == {(i, m) for i in LAYERS for m in TARGETS}
    for (layer, module), s in nlora.sites.items():
        w = base_fp32.weights[f"model.layers.{layer}.{'mlp' if module == 'down_proj' else 'self_attn'}.{module}.weight"]
        assert torch.equal(s.A, w[:R, :]) and torch.equal(s.N, w[:R, :R]) and torch.equal(s.B, w[:, :R])
        assert s.scaling == 8 / R
        assert s.A.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()  # a view, no copy
    assert nlora.is_tied and nlora.flavour == "inttune-tied"
    assert nlora.held_bytes() == R * R * 4 * len(LAYERS) * len(TARGETS)  # r² · sites · 4 bytes


def test_pinv_variant_inverts_the_corner_and_shares_the_family(nlora, base_fp32):
    pinv = init_adapter(base_fp32, rank=R, targets=TARGETS, layers=LAYERS, alpha=8, variant="nlora-pinv")
    for s in pinv.sites.values():
        eye = s.N.double() @ s.A.double()[:, :R]
        torch.testing.assert_close(eye, torch.eye(R, dtype=torch.float64), atol=1e-3, rtol=0)
    assert pinv.is_tied and pinv.family_key == nlora.family_key
    assert pinv.content_hash != nlora.content_hash


def test_slora_is_seeded_random_with_zero_b(base_fp32):
    a1, a2, b = (init_adapter(base_fp32, rank=R, targets=["q_proj"], layers=[0], variant="slora", seed=s)
                 for s in (1, 1, 2))
    assert a1.content_hash == a2.content_hash != b.content_hash
    s = a1.sites[(0, "q_proj")]
    assert not a1.is_tied and a1.flavour == "nlora" and not s.B.any()
    assert s.A.abs().max() <= 1 / math.sqrt(576) and s.N.abs().max() <= 1 / math.sqrt(R)


def _deltas(adapter):
    return {k: s.delta() for k, s in adapter.sites.items()}


def test_full_form_round_trip_keeps_the_maths_and_the_reference_layout(nlora, base_fp32, tmp_path):
    write_adapter(nlora, tmp_path / "full")
    with safe_open(str(tmp_path / "full" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.7.mlp.down_proj.lora_N.weight" in keys and len(keys) == 3 * 6
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "n_lora" and cfg["peft_type"] == "LORA" and "nlora_serve" not in cfg
    back = read_adapter(tmp_path / "full", base_fp32)
    assert back.is_tied and back.content_hash == nlora.content_hash
    assert all(torch.equal(back.sites[k].N, s.N) for k, s in nlora.sites.items())


def test_compact_tied_form_holds_only_n_and_reads_back_to_the_same_maths(nlora, base_fp32, tmp_path):
    write_adapter(nlora, tmp_path / "tied", tied_form=True)
    stored = load_file(str(tmp_path / "tied" / "adapter_model.safetensors"))
    assert all(k.endswith(".lora_N.weight") for k in stored) and len(stored) == 6
    cfg = json.loads((tmp_path / "tied" / "adapter_config.json").read_text())
    assert cfg["nlora_serve"]["format"] == "tied-n" and cfg["nlora_serve"]["family"] == nlora.family_key
    back = read_adapter(tmp_path / "tied", base_fp32)
    assert back.content_hash == nlora.content_hash and back.held_bytes() == nlora.held_bytes()
    for k, d in _deltas(nlora).items():
        assert torch.equal(back.sites[k].delta(), d)


def _edit(path, fn):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_perturbing_a_unties(nlora, base_fp32, tmp_path):
    write_adapter(nlora, tmp_path / "a")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit(tmp_path / "a", lambda t: t[key].__setitem__((1, 3), t[key][1, 3] * 1.001))
    back = read_adapter(tmp_path / "a", base_fp32)
    assert not back.is_tied and back.flavour == "nlora" and back.held_bytes() > 30 * nlora.held_bytes()
    with pytest.raises(AdapterError, match="needs a Nyström-tied adapter"):
        write_adapter(back, tmp_path / "b", tied_form=True)


def test_tied_within_fp16_rounding_but_not_beyond(nlora, base_fp32, tmp_path):
    write_adapter(nlora, tmp_path / "h", dtype=torch.float16)
    assert read_adapter(tmp_path / "h", base_fp32).is_tied
    key = "base_model.model.model.layers.7.mlp.down_proj.lora_B.weight"
    _edit(tmp_path / "h", lambda t: t[key].__setitem__((5, 0), t[key][5, 0] * 1.01))
    assert not read_adapter(tmp_path / "h", base_fp32).is_tied


@pytest.mark.parametrize("field,value,words", [
    ("base_fingerprint", "0" * 64, "not of the loaded base"),
    ("family", "f" * 64, "does not match the family"),
])
def test_compact_form_for_another_base_or_family_is_refused(nlora, base_fp32, tmp_path, field, value, words):
    write_adapter(nlora, tmp_path / "t", tied_form=True)
    path = tmp_path / "t" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["nlora_serve"][field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=words):
        read_adapter(tmp_path / "t", base_fp32)


def test_compact_form_with_an_a_tensor_is_refused(nlora, base_fp32, tmp_path):
    write_adapter(nlora, tmp_path / "t", tied_form=True)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit(tmp_path / "t", lambda t: t.__setitem__(key, torch.zeros(R, 576)))
    with pytest.raises(AdapterError, match="only lora_N"):
        read_adapter(tmp_path / "t", base_fp32)


def test_family_key_depends_on_rank_and_targets(base_fp32, nlora):
    other_r = init_adapter(base_fp32, rank=R + 1, targets=TARGETS, layers=LAYERS)
    other_t = init_adapter(base_fp32, rank=R, targets=TARGETS[:2], layers=LAYERS)
    assert len({nlora.family_key, other_r.family_key, other_t.family_key}) == 3


@pytest.mark.parametrize("kwargs,words", [
    ({"targets": ["lm_head"]}, "lm_head"), ({"targets": ["k_proj"], "rank": 200}, "rank 200 exceeds k_proj"),
    ({"layers": [30]}, "layers [30]"), ({"variant": "pissa"}, "'pissa'"),
])
def test_init_refuses_bad_requests(base_fp32, kwargs, words):
    args = {"rank": R, "targets": ["q_proj"], **kwargs}
    with pytest.raises(AdapterError, match=words.replace("[", r"\[").replace("]", r"\]")):
        init_adapter(base_fp32, **args)


def test_nlora_changes_the_output_and_slora_does_not(base_fp32):
    x = torch.randn(3, 576, dtype=torch.float64)
    nl = init_adapter(base_fp32, rank=R, targets=["q_proj"], layers=[0]).sites[(0, "q_proj")]
    sl = init_adapter(base_fp32, rank=R, targets=["q_proj"], layers=[0], variant="slora").sites[(0, "q_proj")]
    w = base_fp32.weight(0, "q_proj").double()
    ref = w[:, :R] @ w[:R, :R] @ w[:R, :]  # s = alpha / r = 1 by default
    torch.testing.assert_close(x @ nl.delta().T, x @ ref.T)
    assert not (x @ sl.delta().T).any()
