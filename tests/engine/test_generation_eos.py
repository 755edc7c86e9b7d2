"""The generation config's ``eos_token_id`` as vLLM 0.32 takes it (engine/eos.py): its ids end a
request as stop token ids (the id is the stop reason) beside the tokenizer's EOS (no stop reason),
``ignore_eos`` turns both off, and until ``min_tokens`` both are banned, ``ignore_eos`` or not.

The model is the default one (SmolLM2-135M-Instruct), whose greedy answer to "What is 2+2?" is
computed here with transformers; the generation configs are hand-written folders given as
``EngineConfig.generation_config`` (``--generation-config DIR``), holding as an extra EOS the token
the answer reaches at step 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eos_reference import STEP, TOKENIZER_EOS, greedy_answer
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams


@pytest.fixture(scope="module")
def answer(hf_model, base_model_dir) -> tuple[list[int], list[int], torch.Tensor]:
    from transformers import AutoTokenizer

    return greedy_answer(hf_model, AutoTokenizer.from_pretrained(base_model_dir))


def _folder(root: Path, name: str, **files: dict) -> str:
    folder = root / name
    folder.mkdir()
    for file, content in files.items():
        (folder / f"{file}.json").write_text(json.dumps(content))
    return str(folder)


@pytest.fixture
def engine_for(base_fp32):
    engines: list[LLMEngine] = []

    def make(generation_config: str) -> LLMEngine:
        config = EngineConfig(generation_config=generation_config, cache=CacheConfig(num_blocks=64),
                              scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=256))
        engines.append(LLMEngine(config, base_fp32))
        return engines[-1]
    yield make
    for engine in engines:
        engine.shutdown()


def _run(engine: LLMEngine, prompt: list[int], **params):
    return engine.generate([prompt], SamplingParams(temperature=0.0, **params))[0]


@pytest.mark.parametrize("eos", ["list", "int"])
def test_a_generation_config_eos_id_ends_the_request_with_its_id_as_stop_reason(tmp_path, engine_for, answer, eos):
    prompt, ref, _ = answer
    extra = ref[STEP]
    engine = engine_for(_folder(tmp_path, "gen", generation_config={
        "eos_token_id": [TOKENIZER_EOS, extra] if eos == "list" else extra}))
    out = _run(engine, prompt, max_tokens=20)
    assert out.token_ids == ref[:STEP + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", extra)  # vLLM: a stop token id, not the EOS
    assert out.text == engine.tokenizer.decode(ref[:STEP])  # the stop token's text left out


def test_the_tokenizers_eos_ends_a_request_the_generation_config_leaves_it_out_of(tmp_path, engine_for, answer):
    prompt, ref, _ = answer
    engine = engine_for(_folder(tmp_path, "gen", generation_config={"eos_token_id": [0]}))  # never generated
    out = _run(engine, prompt, max_tokens=20)
    assert out.token_ids == ref and (out.finish_reason, out.stop_reason) == ("stop", None)


def test_eos_ids_end_requests_by_id_not_by_their_text(tmp_path, engine_for, answer, base_fp32):
    """Tokens whose text the answer spells ("answer", " ans" inside " answer") but never samples end nothing."""
    prompt, ref, _ = answer
    tokenizer = base_fp32.tokenizer()
    spelled = [tokenizer.encode(text, add_special_tokens=False) for text in ("answer", " ans")]
    assert all(len(ids) == 1 and ids[0] not in ref for ids in spelled)
    assert all(tokenizer.decode(ids) in tokenizer.decode(ref) for ids in spelled)
    engine = engine_for(_folder(tmp_path, "spelled", generation_config={"eos_token_id": [i for i, in spelled]}))
    out = _run(engine, prompt, max_tokens=20)
    assert out.token_ids == ref and (out.finish_reason, out.stop_reason) == ("stop", None)


def test_ignore_eos_turns_off_the_generation_configs_ids_and_the_tokenizers(tmp_path, engine_for, answer):
    prompt, ref, _ = answer
    engine = engine_for(_folder(tmp_path, "gen", generation_config={"eos_token_id": [TOKENIZER_EOS, ref[STEP]]}))
    out = _run(engine, prompt, max_tokens=len(ref), ignore_eos=True)
    assert out.token_ids == ref and (out.finish_reason, out.stop_reason) == ("length", None)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_bans_every_eos_id_ignore_eos_or_not(tmp_path, engine_for, answer, ignore_eos):
    """vLLM bans ``all_stop_token_ids`` (the tokenizer's EOS and the generation config's among them,
    whatever ignore_eos says) before min_tokens: step STEP takes the best other token."""
    prompt, ref, logits = answer
    extra = ref[STEP]
    engine = engine_for(_folder(tmp_path, "gen", generation_config={"eos_token_id": [TOKENIZER_EOS, extra]}))
    banned = logits.clone()
    banned[[extra, TOKENIZER_EOS]] = -float("inf")
    top = banned.topk(2)
    assert top.values[0] - top.values[1] > 1e-3
    out = _run(engine, prompt, max_tokens=STEP + 1, min_tokens=STEP + 1, ignore_eos=ignore_eos)
    assert out.token_ids == ref[:STEP] + [int(top.indices[0])] and out.finish_reason == "length"


def test_the_fallback_to_config_json_is_taken_only_without_a_generation_config_json(tmp_path, engine_for, answer,
                                                                                     base_model_dir):
    """vLLM's try_get_generation_config: generation_config.json, else transformers'
    GenerationConfig.from_model_config(config.json), which keeps the config's eos_token_id."""
    prompt, ref, _ = answer
    config = {**json.loads((base_model_dir / "config.json").read_text()), "eos_token_id": [TOKENIZER_EOS, ref[STEP]]}
    only_config = _folder(tmp_path, "config-only", config=config)
    both = _folder(tmp_path, "both", config=config, generation_config={"temperature": 0.5})  # no eos_token_id
    out = _run(engine_for(only_config), prompt, max_tokens=20)
    assert out.token_ids == ref[:STEP + 1] and out.stop_reason == ref[STEP]
    out = _run(engine_for(both), prompt, max_tokens=20)
    assert out.token_ids == ref and out.stop_reason is None


@pytest.mark.parametrize("value, message", [
    ([2, 49152], "eos_token_id 49152 is outside the model's vocabulary [0, 49152)"),
    (-1, "eos_token_id -1 is outside the model's vocabulary [0, 49152)"),
    ("2", "eos_token_id must be a token id or a list of them; got '2'"),
    ([2, True], "eos_token_id must be a token id or a list of them; got [2, True]"),
])
def test_a_bad_eos_token_id_stops_the_engine_start_naming_the_file(tmp_path, base_fp32, value, message):
    folder = _folder(tmp_path, "gen", generation_config={"eos_token_id": value})
    with pytest.raises(ValueError) as err:
        LLMEngine(EngineConfig(generation_config=folder), base_fp32)
    assert str(err.value) == f"{folder}/generation_config.json: {message}"
