"""``adapters convert``: the folded LoRA, loaded by the real ``peft`` library, gives our logits."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from adapter_helpers import CASES, file_deltas, load_case, merged
from safetensors.torch import load_file

from nlora_serve.adapters.convert import convert_dir
from nlora_serve.adapters.loader import read_adapter
from nlora_serve.errors import AdapterError


@pytest.mark.parametrize("name", ["nlora-reference-format", "inttune-nystrom-tied"])
def test_nlora_folded_to_lora_gives_the_same_logits_in_peft(name, base_fp32, hf_model, work_model, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    convert_dir(CASES / name, "lora", out, base_fp32)
    folded = load_file(str(out / "adapter_model.safetensors"))
    assert folded and not any("lora_N" in k for k in folded)
    src = load_file(str(CASES / name / "adapter_model.safetensors"))
    key = next(k for k in src if k.endswith("lora_N.weight"))
    b_key = key.replace("lora_N", "lora_B")
    torch.testing.assert_close(folded[b_key].double(), src[b_key].double() @ src[key].double())
    ids = torch.tensor([load_case(name)["references"][0]["prompt_token_ids"]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(out)).eval()(ids).logits
        with merged(work_model, *file_deltas(CASES / name)) as model:  # the NLoRA maths, merged independently
            want = model(ids).logits
        moved = (want - hf_model(ids).logits).abs().max()
    # PEFT runs unmerged (W x + s B'(A x)), the reference merged (W + s B N A) x: in float32 the two
    # orders differ by rounding only, measured 2e-6 and 4e-6 of the largest logit (|logit| ~ 40),
    # while the adapter itself moves logits by > 20.
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() and moved > 1


def test_lora_to_nlora_adds_identity_n_and_keeps_the_rest_and_the_hash(base_fp32, tmp_path):
    src = CASES / "lora-peft-all-modules"
    converted = convert_dir(src, "nlora", tmp_path / "n", base_fp32)
    tensors = load_file(str(tmp_path / "n" / "adapter_model.safetensors"))
    n_keys = [k for k in tensors if k.endswith("lora_N.weight")]
    assert len(n_keys) == 70 and all(torch.equal(tensors[k], torch.eye(4)) for k in n_keys)
    original = load_file(str(src / "adapter_model.safetensors"))
    assert {k: v for k, v in tensors.items() if k not in n_keys}.keys() == original.keys()
    assert all(torch.equal(tensors[k], v) for k, v in original.items())
    assert converted.content_hash == read_adapter(src, base_fp32).content_hash and converted.flavour == "nlora"

def test_convert_keeps_bias_and_config_fields(base_fp32, tmp_path):
    convert_dir(CASES / "lora-bias", "lora", tmp_path / "b", base_fp32)
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert any(k.endswith("lora_B.bias") for k in load_file(str(tmp_path / "b" / "adapter_model.safetensors")))


def test_convert_refuses_unknown_target_and_bad_sources(base_fp32, tmp_path):
    with pytest.raises(AdapterError, match="--to 'gguf'"):
        convert_dir(CASES / "lora-bias", "gguf", tmp_path / "x", base_fp32)
    with pytest.raises(AdapterError, match="pickle"):
        convert_dir(CASES / "pickle-bin", "lora", tmp_path / "y", base_fp32)
    convert_dir(CASES / "lora-bias", "nlora", tmp_path / "z", base_fp32)
    with pytest.raises(AdapterError, match="already holds an adapter"):
        convert_dir(CASES / "lora-bias", "nlora", tmp_path / "z", base_fp32)
