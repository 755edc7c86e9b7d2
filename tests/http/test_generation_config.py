"""``serve --generation-config`` / ``--override-generation-config`` (vLLM 0.32's flags): a request's
unset sampling fields take the model's generation_config.json; a field the request sets wins.

The model is a tiny random Llama folder with a hand-written generation_config.json (the reference
values below); the server is built by the serve command itself, and the SamplingParams the engine
receives are read at ``Engine.add_request``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request
from pathlib import Path

import pytest

from grpc_harness import RunningServer
from nlora_serve.client import NloraClient
from nlora_serve.serving.commands import serve as serve_cli
from nlora_serve.serving.commands import serve_build
from nlora_serve.serving.generation_config import SamplingDefaults, sampling_defaults
from nlora_serve.serving.server_config import StartupError

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_llama import make_tiny_llama  # noqa: E402

# a Llama-3-Instruct-like file: sampling fields beside token ids and flags that are no sampling field
FILE = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 1.7, "top_p": 0.9, "top_k": 40,
        "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 12, "transformers_version": "5.0.0"}
FROM_FILE = SamplingDefaults(temperature=1.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, max_tokens=12)
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("generation-config") / "tiny-llama"
    make_tiny_llama(folder)
    (folder / "generation_config.json").write_text(json.dumps(FILE))
    return folder


def _folder(root: Path, name: str, **files: dict) -> Path:
    folder = root / name
    folder.mkdir()
    for file, content in files.items():
        (folder / f"{file}.json").write_text(json.dumps(content))
    return folder


def test_auto_reads_the_sampling_fields_of_the_models_file(model_dir):
    defaults, line = sampling_defaults("auto", {}, model_dir)
    assert defaults == FROM_FILE
    assert line.startswith("Default sampling parameters have been overridden by the model's `generation_config.json`")
    assert "'temperature': 1.7" in line and "'max_tokens': 12" in line and "do_sample" not in line


def test_vllm_reads_nothing_and_the_override_merges_over_the_file(model_dir):
    assert sampling_defaults("vllm", {}, model_dir)[0] == SamplingDefaults()
    assert sampling_defaults("vllm", {"temperature": 0.3}, model_dir)[0] == SamplingDefaults(temperature=0.3)
    # null unsets the file's field; the override's max_new_tokens is also a cap (vLLM's override_max_tokens)
    defaults, _ = sampling_defaults("auto", {"temperature": 0.3, "top_k": None, "max_new_tokens": 5}, model_dir)
    assert defaults == SamplingDefaults(temperature=0.3, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                        max_tokens=5, max_tokens_cap=5)


def test_a_folder_path_reads_its_file_whose_max_new_tokens_caps_every_request(tmp_path, model_dir):
    folder = _folder(tmp_path, "gen", generation_config={"temperature": 0.5, "max_new_tokens": 7})
    assert sampling_defaults(str(folder), {}, model_dir)[0] == SamplingDefaults(temperature=0.5, max_tokens=7,
                                                                                max_tokens_cap=7)



def test_a_folder_without_the_file_reads_its_config_json_as_vllm_does(tmp_path, model_dir):
    """vLLM's try_get_generation_config falls back to GenerationConfig.from_model_config(config.json):
    run on this config.json in vLLM 0.32's venv (transformers 5.19) it kept max_new_tokens 7 and none of
    temperature, top_p, repetition_penalty; its max_new_tokens caps (a folder path's, as vLLM's
    override_max_tokens). A folder with neither file is refused (vLLM fails there too)."""
    config = json.loads((model_dir / "config.json").read_text())
    folder = _folder(tmp_path, "cfg", config={**config, "temperature": 0.3, "top_p": 0.5, "max_new_tokens": 7,
                                             "repetition_penalty": 1.2})
    defaults, line = sampling_defaults(str(folder), {}, model_dir)
    assert defaults == SamplingDefaults(max_tokens=7, max_tokens_cap=7)
    assert f"({folder / 'config.json'})" in line and "'max_tokens': 7" in line
    empty = _folder(tmp_path, "empty")
    with pytest.raises(ValueError) as err:
        sampling_defaults(str(empty), {}, model_dir)
    assert str(err.value) == (f"--generation-config {empty}: neither generation_config.json nor config.json in that "
                              "folder (vLLM reads the latter's generation fields where the former is missing)")


def test_the_default_gguf_model_has_no_generation_config(base_model_dir):
    """SmolLM2's GGUF metadata has no sampling key (llama.cpp's general.sampling.*), so the converted
    folder's generation_config.json has none either: auto changes nothing, and the log says why."""
    import gguf

    from nlora_serve.models.resolve import default_gguf

    # The metadata comes from the wheel's file; the log names the path recorded at conversion, which
    # a cache reused from another checkout or venv keeps (the cache is keyed by the file's hash).
    source = json.loads((base_model_dir / "nlora_model.json").read_text())["source"]
    keys = [k for k in gguf.GGUFReader(default_gguf()).fields
            if "sampling" in k or any(f in k for f in ("temperature", "top_k", "top_p", "min_p", "penalty"))]
    assert keys == []
    defaults, line = sampling_defaults("auto", {}, base_model_dir)
    assert defaults == SamplingDefaults()
    assert line == (f"--generation-config auto: {base_model_dir / 'generation_config.json'} sets no sampling field "
                    f"(converted from the GGUF file {source}, whose metadata carries no generation config); the "
                    "default sampling parameters are vLLM's.")


def _args(tmp_path: Path, model_dir: Path, tokenizer: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    return parser.parse_args(["--model", str(model_dir), "--tokenizer", str(tokenizer), "--port", "0",
                              "--http-port", "0", "--dtype", "float32", "--max-model-len", "256",
                              "--kv-cache-memory-bytes", str(32 << 20),  # 45 blocks, not 1 GiB
                              "--adapter-dir", str(tmp_path / "store"), *flags])


@pytest.mark.parametrize("file, flags, message", [
    ({"temperature": -1}, (), "{file}: temperature=-1: must be in [0, 100] (--generation-config auto; override it "
                              "with --override-generation-config, or use --generation-config vllm)"),
    ({"top_k": "40"}, (), "{file}: top_k='40': must be an integer (--generation-config auto; override it with "
                          "--override-generation-config, or use --generation-config vllm)"),
    ({}, ("--generation-config", "/no/such/folder"), "--generation-config /no/such/folder: not a folder; expected "
                                                     "auto, vllm or a folder holding generation_config.json"),
])
def test_bad_file_values_stop_the_start_naming_the_file_and_field(tmp_path, base_model_dir, monkeypatch, file, flags,
                                                                  message):
    def load_base(*args, **kwargs):
        raise AssertionError("the model was loaded before the generation config was checked")
    monkeypatch.setattr(serve_build, "load_base", load_base)
    folder = _folder(tmp_path, "model", generation_config=file)
    (folder / "config.json").symlink_to(base_model_dir / "config.json")
    (folder / "model.safetensors").symlink_to(base_model_dir / "model.safetensors")
    with pytest.raises(StartupError) as err:
        serve_cli.build(_args(tmp_path, folder, base_model_dir, *flags))
    assert str(err.value) == message.format(file=folder / "generation_config.json")


def test_a_file_nested_past_the_parser_stops_the_start_naming_it(tmp_path, base_model_dir):
    folder = _folder(tmp_path, "deep")
    (folder / "generation_config.json").write_text("[" * 100_000)  # was a RecursionError's traceback
    with pytest.raises(ValueError) as err:
        sampling_defaults(str(folder), {}, base_model_dir)
    assert str(err.value) == f"{folder / 'generation_config.json'}: cannot read it as JSON (nested too deeply)"


def test_override_keys_that_are_no_sampling_field_are_ignored_with_a_warning(caplog, model_dir):
    """vLLM's get_diff_sampling_param reads only its eight sampling fields of the merged config:
    other keys of --override-generation-config change nothing (they were refused here)."""
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    with caplog.at_level(logging.WARNING, logger="nlora_serve.serving.generation_config"):
        args = parser.parse_args(["--override-generation-config",
                                  '{"temprature": 0.5, "do_sample": true, "top_p": 0.8}'])
    assert args.override_generation_config == {"temprature": 0.5, "do_sample": True, "top_p": 0.8}
    assert "'temprature', 'do_sample' are no sampling field, ignored" in caplog.text
    defaults, _ = sampling_defaults("vllm", args.override_generation_config, model_dir)
    assert defaults == SamplingDefaults(top_p=0.8)


@pytest.mark.parametrize("value, message", [
    ('{"temperature": -0.5}', "temperature=-0.5: must be in [0, 100]"),
    ('{"max_new_tokens": 0}', "max_new_tokens=0: must be an integer >= 1"),
    ('[0.5]', "expected a JSON object such as '{\"temperature\": 0.5}'; got '[0.5]'"),
    ("[" * 100_000, "nested too deeply to parse; expected an object such as '{\"temperature\": 0.5}'"),  # a traceback
])
def test_a_bad_override_is_a_usage_error_naming_the_flag_and_field(capsys, value, message):
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--override-generation-config", value])
    assert f"argument --override-generation-config: {message}" in capsys.readouterr().err


class _Served:
    """A server built by ``serve`` from flags, recording the SamplingParams its engine receives."""

    def __init__(self, args: argparse.Namespace):
        engine, server, _, batch = serve_cli.build(args)
        batch.commit()  # as serve commits it once its servers are started
        self.received = []
        add_request = engine.add_request

        def record(prompt, params, **kwargs):
            self.received.append(params)
            return add_request(prompt, params, **kwargs)
        engine.add_request = record
        self.running = RunningServer(engine, server.config, server.generation.auth, server.generation.info,
                                     server.generation.tokenizer)
        self.model = server.config.served_model_name

    def post(self, path: str, **body) -> dict:
        url = f"http://127.0.0.1:{self.running.server.http_port}/v1/{path}"
        request = urllib.request.Request(url, json.dumps({"model": self.model, **body}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:  # raises HTTPError unless 2xx
            return json.loads(response.read())

    def grpc(self, **sampling):
        with NloraClient(self.running.target, timeout=60) as client:
            return [t for d in client.generate("The sea", **sampling) for t in d.token_ids]

    def close(self):
        self.running.stop()
        self.running.engine.shutdown()


@pytest.fixture
def served(tmp_path, model_dir, base_model_dir):
    servers = []

    def make(*flags: str) -> _Served:
        servers.append(_Served(_args(tmp_path / str(len(servers)), model_dir, base_model_dir, *flags)))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def _fields(params) -> tuple:
    return (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.presence_penalty, params.frequency_penalty, params.max_tokens)


def test_unset_fields_take_the_files_defaults_on_every_endpoint_and_set_ones_win(served, caplog):
    with caplog.at_level(logging.WARNING, logger="nlora_serve.serve"):
        server = served()
    assert "overridden by the model's `generation_config.json`" in caplog.text
    server.post("chat/completions", messages=CHAT)
    server.post("completions", prompt="The sea")
    server.grpc()
    # the file's values; max_tokens 12 (under the rest of the context, as vLLM's get_max_tokens), but
    # completions' own default 16 (vLLM 0.32's CompletionRequest.max_tokens: its file default never applies)
    file_values = (1.7, 0.9, 40, 0.05, 1.1, 0.0, 0.0)
    assert [_fields(p) for p in server.received] == [file_values + (12,), file_values + (16,), file_values + (12,)]
    server.received.clear()
    sent = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_tokens=20)
    server.post("chat/completions", messages=CHAT, min_p=0.0, **sent)
    server.post("completions", prompt="The sea", min_p=0.0, **sent)
    server.grpc(**sent)
    # each sent field wins (greedy stays greedy); the gRPC proto has no min_p: the file's applies there
    assert [_fields(p) for p in server.received] == [(0.0, 1.0, 0, 0.0, 1.0, 0.0, 0.0, 20)] * 2 + [
        (0.0, 1.0, 0, 0.05, 1.0, 0.0, 0.0, 20)]
    assert server.received[0].greedy


def test_vllm_and_override_flags_reach_the_requests(served):
    server = served("--generation-config", "vllm")
    server.post("chat/completions", messages=CHAT)
    server.grpc()
    # the APIs' own defaults: OpenAI's temperature 1 over HTTP, greedy over gRPC; max_tokens the rest of the context
    rest = 256 - len(server.running.engine.prompt_ids("The sea"))
    assert _fields(server.received[0])[:7] == (1.0, 1.0, 0, 0.0, 1.0, 0.0, 0.0)
    assert _fields(server.received[1]) == (0.0, 1.0, 0, 0.0, 1.0, 0.0, 0.0, rest)
    server = served("--override-generation-config", '{"temperature": 0.25, "top_k": null, "max_new_tokens": 8, '
                                                    '"presence_penalty": 0.5}')
    server.post("chat/completions", messages=CHAT)
    server.post("completions", prompt="The sea", max_tokens=30)  # over the override's cap: lowered, as vLLM
    assert [_fields(p) for p in server.received] == [(0.25, 0.9, 0, 0.05, 1.1, 0.5, 0.0, 8)] * 2


def test_a_seeded_request_under_the_files_temperature_samples_as_one_that_sends_it(served):
    """End to end: the file's temperature (1.7) and top_k reach the sampler: the same tokens as a request
    sending them, other tokens than a request sending vLLM's defaults (the control)."""
    server = served("--override-generation-config", '{"top_p": null, "min_p": null, "repetition_penalty": null}')
    body = dict(prompt="The sea", max_tokens=12, seed=7, ignore_eos=True, logprobs=0)

    def tokens(**fields) -> list[str]:
        return server.post("completions", **body, **fields)["choices"][0]["logprobs"]["tokens"]
    from_file = tokens()
    assert from_file == tokens(temperature=1.7, top_k=40)
    assert from_file != tokens(temperature=1.0, top_k=0)
