"""``generate`` takes the generation config as vLLM's offline ``LLM.generate`` does
(``get_default_sampling_params``): a sampling flag not given takes the model's generation_config.json
(``--generation-config auto``), a folder's, or ``--override-generation-config``'s value, else its own
default; the config's ``eos_token_id`` ends the answer (engine/eos.py).

The model is the default one linked into folders with hand-written generation_config.json files; the
expected text is transformers' greedy answer (tests/engine/eos_reference.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nlora_serve.cli import build_parser, main as cli_main
from nlora_serve.serving.commands.generate import sampling_params

sys.path.insert(0, str(Path(__file__).parent / "engine"))
from eos_reference import QUESTION, STEP, greedy_answer, model_folder  # noqa: E402

SAMPLING = {"temperature": 0.7, "top_k": 5, "top_p": 0.8, "min_p": 0.1, "repetition_penalty": 1.2,
            "presence_penalty": 0.3, "frequency_penalty": 0.4, "max_new_tokens": 9}


@pytest.fixture(scope="module")
def answer(hf_model, base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    return greedy_answer(hf_model, tokenizer)[1], tokenizer


def _params(folder: Path, *flags: str):
    return sampling_params(build_parser().parse_args(["generate", "--message", "Hi", *flags]), folder)


def _fields(params) -> dict:
    return {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty, "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty, "max_new_tokens": params.max_tokens}


def test_flags_not_given_take_the_files_values_and_given_ones_win(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({**SAMPLING, "eos_token_id": 2, "do_sample": True}))
    assert _fields(_params(folder)) == SAMPLING
    flags = ("--temperature", "0", "--top-k", "0", "--top-p", "1", "--max-tokens", "20")
    assert _fields(_params(folder, *flags)) == {**SAMPLING, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                                "max_new_tokens": 20}
    # vllm: none of the file's; the flags' own defaults (greedy, 128 tokens)
    assert _fields(_params(folder, "--generation-config", "vllm")) == {
        "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_new_tokens": 128}
    # the override over the file; its max_new_tokens caps --max-tokens (vLLM's override_max_tokens)
    got = _params(folder, "--override-generation-config", '{"top_k": null, "max_new_tokens": 4}', "--max-tokens", "20")
    assert _fields(got) == {**SAMPLING, "top_k": 0, "max_new_tokens": 4}


def _generate(capsys, model: Path, *flags: str) -> str:
    """``generate``'s stdout; a 32 MiB KV cache (45 blocks; the answers are at most ~20 tokens), not the
    CPU's default 1 GiB: four builds of it peaked at 3.5 GB in this module."""
    code = cli_main(["generate", "--model", str(model), "--message", QUESTION[0]["content"], "--dtype", "float32",
                     "--no-stream", "--max-model-len", "256", "--kv-cache-memory-bytes", str(32 << 20), *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_generate_stops_and_ends_where_the_generation_config_says(tmp_path, base_model_dir, answer, capsys):
    ref, tokenizer = answer
    # the model's max_new_tokens is the answer's length (no --max-tokens given)
    model = model_folder(tmp_path / "model", base_model_dir, {"eos_token_id": 2, "max_new_tokens": 4})
    assert _generate(capsys, model) == tokenizer.decode(ref[:4]) + "\n"
    # --generation-config vllm takes none of its sampling fields: the whole answer, to the EOS
    assert _generate(capsys, model, "--generation-config", "vllm") == tokenizer.decode(ref[:-1]) + "\n"
    # a max_new_tokens over the context (256) is lowered to the rest of it, not refused, as a server's unset max_tokens
    assert _generate(capsys, model, "--override-generation-config", '{"max_new_tokens": 1000}') == \
        tokenizer.decode(ref[:-1]) + "\n"
    # a folder's eos_token_id ends the answer at that token (its text left out)
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [ref[STEP]]}))
    assert _generate(capsys, model, "--generation-config", str(folder)) == tokenizer.decode(ref[:STEP]) + "\n"


def test_a_bad_generation_config_folder_is_one_error_line(tmp_path, capsys):
    assert cli_main(["generate", "--message", "Hi", "--generation-config", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.endswith(f"error: --generation-config {tmp_path / 'none'}: not a folder; expected "
                                            "auto, vllm or a folder holding generation_config.json\n")


def test_the_log_line_names_generates_own_defaults_where_the_config_sets_none(tmp_path, caplog):
    # A newcomer's find (h95): `generate` logged "the default sampling parameters are vLLM's" (temperature 1)
    # and then answered greedily, as its --help says; the line now names the defaults it runs with.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    caplog.set_level("INFO")
    for flags, why in [((), f"{folder / 'generation_config.json'} sets no sampling field"),
                       (("--generation-config", "vllm"), "the model's generation config unread")]:
        caplog.clear()
        got = _fields(_params(folder, *flags))
        assert (got["temperature"], got["top_k"], got["top_p"], got["max_new_tokens"]) == (0.0, 0, 1.0, 128)
        source = flags[1] if flags else "auto"
        assert caplog.messages == [f"--generation-config {source}: {why}; the default sampling parameters are "
                                   "generate's own (greedy, 128 tokens)."]


def test_a_sampling_flag_out_of_range_is_named_as_typed_and_a_files_value_as_the_files(tmp_path):
    """A bad --temperature is refused in the flag's words (it said SamplingParams.temperature, the
    class that checked it); a generation config's own bad value is named by its file and field, not
    as a flag the user never typed."""
    from nlora_serve.errors import NloraError

    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(NloraError, match=r"^--temperature -1\.0: must be in \[0, 100\]; got -1\.0$"):
        _params(folder, "--temperature", "-1")
    with pytest.raises(NloraError, match=r"^--top-k -5: must be an integer in \[0, 2\^63\)"):
        _params(folder, "--top-k", "-5")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 500.0}))
    with pytest.raises(NloraError, match=r"generation_config\.json: temperature=500\.0: must be in \[0, 100\]") as err:
        _params(folder)
    assert "--temperature" not in str(err.value)
