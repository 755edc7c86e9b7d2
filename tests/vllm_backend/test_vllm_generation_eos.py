"""The generation config's EOS ids (engine/eos.py) and ``generate``'s defaults against vLLM 0.32 itself.

- The stop tokens, the min_tokens ban and the stop reasons our engine derives equal those vLLM's
  ``SamplingParams.update_from_generation_config`` derives from what its ``ModelConfig.try_get_generation_config``
  reads (run on a stand-in holding the fields it reads), over folders, ``--generation-config``
  sources, ignore_eos and stop_token_ids.
- End to end: vLLM's offline ``LLM.generate`` with no SamplingParams (``get_default_sampling_params``)
  on a model folder whose generation_config.json sets a greedy top_k, max_new_tokens and an extra EOS
  gives the tokens, text, finish and stop reason of our engine under ``generate``'s parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nlora_serve.cli import build_parser
from nlora_serve.engine.eos import eos_tokens

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from eos_reference import STEP, TOKENIZER_EOS, greedy_answer, model_folder  # noqa: E402

VOCAB = 49152


def _vllm_generation_config(source: str, model_dir: Path) -> dict:
    from vllm.config.model import ModelConfig

    stand_in = SimpleNamespace(generation_config=source, hf_config_path=None, model=str(model_dir),
                               trust_remote_code=False, _hf_config_revision=None, revision=None, code_revision=None,
                               config_format="auto", hf_token=None)
    return ModelConfig.try_get_generation_config(stand_in)


def _write(folder: Path, **files: dict) -> Path:
    folder.mkdir()
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


@pytest.fixture
def cases(tmp_path, base_model_dir):
    config = json.loads((base_model_dir / "config.json").read_text())
    gen_list = _write(tmp_path / "list", config=config, generation_config={"eos_token_id": [2, 314, 30]})
    gen_int = _write(tmp_path / "int", config=config, generation_config={"eos_token_id": 314})
    no_eos = _write(tmp_path / "no-eos", config={**config, "eos_token_id": [2, 314]},
                    generation_config={"temperature": 0.5})
    config_only = _write(tmp_path / "config-only", config={**config, "eos_token_id": [2, 314]})
    other = _write(tmp_path / "other", generation_config={"eos_token_id": [7, 30]})
    return [(source, folder) for folder in (gen_list, gen_int, no_eos, config_only) for source in ("auto", "vllm")] + \
        [(str(other), gen_list)]


@pytest.mark.parametrize("tokenizer_eos", [TOKENIZER_EOS, 314, None])
@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("stop_token_ids", [(), (5, 314)])
def test_stop_tokens_ban_and_reasons_are_vllms(cases, tokenizer_eos, ignore_eos, stop_token_ids):
    from vllm import SamplingParams

    for source, folder in cases:
        params = SamplingParams(stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
        params.update_from_generation_config(_vllm_generation_config(source, folder), tokenizer_eos)
        # check_stop (v1/core/sched/utils.py): the EOS first (no reason), then stop_token_ids (the id)
        want = {t: None if t == params.eos_token_id else t
                for t in {*params.stop_token_ids, *([params.eos_token_id] if params.eos_token_id is not None else [])}}
        eos = eos_tokens(folder, source, tokenizer_eos, VOCAB)
        stops = eos.stops(stop_token_ids, ignore_eos)
        assert {t: eos.stop_reason(t, ignore_eos) for t in stops} == want, (source, folder.name)
        assert eos.banned_before_min_tokens(stop_token_ids) == params.all_stop_token_ids, (source, folder.name)


def _generate_args(folder: Path):
    return build_parser().parse_args(["generate", "--model", str(folder), "--message", "Hi"])


def test_generate_takes_the_generation_config_as_vllms_llm_generate(tmp_path, base_model_dir, hf_model, monkeypatch):
    from transformers import AutoTokenizer
    from vllm import LLM

    from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.serving.commands.generate import sampling_params

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    prompt, ref, _ = greedy_answer(hf_model, tokenizer)
    file = {"eos_token_id": [TOKENIZER_EOS, ref[STEP]], "top_k": 1, "max_new_tokens": 12, "repetition_penalty": 1.0,
            "top_p": 0.95}
    folder = model_folder(tmp_path / "model", base_model_dir, file)
    ours = sampling_params(_generate_args(folder), folder)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(folder), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    try:
        defaults = llm.get_default_sampling_params()
        assert (ours.top_k, ours.top_p, ours.repetition_penalty, ours.max_tokens) == \
            (defaults.top_k, defaults.top_p, defaults.repetition_penalty, defaults.max_tokens) == (1, 0.95, 1.0, 12)
        theirs = llm.generate([{"prompt_token_ids": prompt}])[0].outputs[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    engine = LLMEngine(EngineConfig(model=str(folder), dtype=torch.float32, cache=CacheConfig(num_blocks=64),
                                    scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256,
                                                              max_model_len=256)))
    try:
        got = engine.generate([prompt], ours)[0]
    finally:
        engine.shutdown()
    assert list(theirs.token_ids) == ref[:STEP + 1] == got.token_ids
    assert (got.text, got.finish_reason, got.stop_reason) == (theirs.text, theirs.finish_reason, theirs.stop_reason) \
        == (tokenizer.decode(ref[:STEP]), "stop", ref[STEP])
