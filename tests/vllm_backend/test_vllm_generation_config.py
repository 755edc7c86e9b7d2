"""``--generation-config`` / ``--override-generation-config`` against vLLM 0.32's own code: the
defaults ModelConfig.get_diff_sampling_param returns (run on a stand-in holding the three things it
reads, with vLLM's own try_get_generation_config) and the cap its OpenAI serving layer derives
(``override_max_tokens`` in entrypoints/openai/chat_completion/serving.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from nlora_serve.serving.generation_config import sampling_defaults

FILE = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50,
        "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.2, "max_new_tokens": 64}


def _vllm(source: str, override: dict, model_dir: Path) -> tuple[dict, int | None]:
    from vllm.config.model import ModelConfig
    from vllm.transformers_utils.config import try_get_generation_config

    def read() -> dict:  # ModelConfig.try_get_generation_config without the Hub arguments
        config = try_get_generation_config(str(model_dir) if source in ("auto", "vllm") else source, False)
        return {} if config is None else config.to_diff_dict()

    stand_in = SimpleNamespace(generation_config=source, override_generation_config=override,
                               try_get_generation_config=read)
    diff = ModelConfig.get_diff_sampling_param(stand_in)
    cap = diff.get("max_tokens") if source not in ("auto", "vllm") else override.get("max_new_tokens")
    return diff, cap


@pytest.fixture
def folders(tmp_path):
    from transformers import LlamaConfig

    model = tmp_path / "model"
    LlamaConfig(num_hidden_layers=1).save_pretrained(model)
    (model / "generation_config.json").write_text(json.dumps(FILE))
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "max_new_tokens": 7}))
    # no generation_config.json, sampling fields in config.json: vLLM's fallback (transformers'
    # from_model_config) keeps only max_new_tokens of them under transformers 5
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = {**json.loads((model / "config.json").read_text()), "temperature": 0.8, "top_k": 9, "max_new_tokens": 11}
    (legacy / "config.json").write_text(json.dumps(config))
    return model, other, legacy


@pytest.mark.parametrize("case", range(9))
def test_the_defaults_and_the_cap_are_vllms(folders, case):
    model, other, legacy = folders
    source, override, folder = [("auto", {}, model), ("vllm", {}, model),
                                ("vllm", {"temperature": 0.2, "max_new_tokens": 5}, model),
                                ("auto", {"temperature": None, "top_k": 5, "max_new_tokens": 9}, model),
                                (str(other), {}, model), (str(other), {"max_new_tokens": None, "top_p": 0.5}, model),
                                ("auto", {}, legacy), (str(legacy), {}, model),
                                ("auto", {"do_sample": False, "eos_token_id": 7, "top_k": 3}, model)][case]
    want, cap = _vllm(source, override, folder)
    got, _ = sampling_defaults(source, override, folder)
    assert {k: v for k, v in got.as_dict().items() if k != "max_tokens_cap"} == want
    assert got.max_tokens_cap == cap
