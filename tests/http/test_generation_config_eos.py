"""``serve``: the generation config's ``eos_token_id`` ends requests on HTTP (both endpoints) and
gRPC as vLLM 0.32's server does (engine/eos.py): the model folder's under ``--generation-config
auto`` and ``vllm``, a folder's under ``--generation-config DIR``; the id is the stop reason;
``ignore_eos`` runs past it.

The model is the default one linked into a folder with a hand-written generation_config.json whose
extra EOS is the token transformers' greedy answer reaches at step STEP (tests/engine/eos_reference.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

import pytest

from grpc_harness import RunningServer
from nlora_serve.client import NloraClient
from nlora_serve.serving.commands import serve as serve_cli

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from eos_reference import QUESTION, STEP, TOKENIZER_EOS, greedy_answer, model_folder  # noqa: E402


@pytest.fixture(scope="module")
def answer(hf_model, base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    prompt, ref, _ = greedy_answer(hf_model, tokenizer)
    return prompt, ref, tokenizer


class _Served:
    """A server built by ``serve`` from flags (``serve_cli.build``), HTTP and gRPC on free ports."""

    def __init__(self, root: Path, model: Path, *flags: str):
        parser = argparse.ArgumentParser()
        serve_cli.add_serve_arguments(parser)
        args = parser.parse_args(["--model", str(model), "--port", "0", "--http-port", "0", "--dtype", "float32",
                                  "--max-model-len", "256", "--kv-cache-memory-bytes", str(32 << 20),  # 45 blocks, not 1 GiB
                                  "--adapter-dir", str(root / "store"), *flags])
        engine, server, _, batch = serve_cli.build(args)
        batch.commit()  # as serve commits it once its servers are started
        self.running = RunningServer(engine, server.config, server.generation.auth, server.generation.info,
                                     server.generation.tokenizer)
        self.model = server.config.served_model_name

    def post(self, path: str, **body) -> dict:
        url = f"http://127.0.0.1:{self.running.server.http_port}/v1/{path}"
        request = urllib.request.Request(url, json.dumps({"model": self.model, **body}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def grpc(self, prompt: list[int], **sampling) -> tuple[list[int], str]:
        with NloraClient(self.running.target, timeout=120) as client:
            deltas = list(client.generate(prompt, temperature=0.0, **sampling))
        return [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason

    def close(self):
        self.running.stop()
        self.running.engine.shutdown()


@pytest.fixture
def served(tmp_path, base_model_dir):
    servers = []

    def make(generation_config: dict | None, *flags: str) -> _Served:
        root = tmp_path / str(len(servers))
        servers.append(_Served(root, model_folder(root / "model", base_model_dir, generation_config), *flags))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize("source", ["auto", "vllm"])
def test_the_models_eos_ids_end_requests_on_every_endpoint(served, answer, source):
    prompt, ref, tokenizer = answer
    extra = ref[STEP]
    server = served({"eos_token_id": [TOKENIZER_EOS, extra]}, "--generation-config", source)
    want_text = tokenizer.decode(ref[:STEP])
    chat = server.post("chat/completions", messages=QUESTION, temperature=0, max_tokens=20)["choices"][0]
    assert (chat["message"]["content"], chat["finish_reason"], chat["stop_reason"]) == (want_text, "stop", extra)
    done = server.post("completions", prompt=prompt, temperature=0, max_tokens=20)["choices"][0]
    assert (done["text"], done["finish_reason"], done["stop_reason"]) == (want_text, "stop", extra)
    assert server.grpc(prompt, max_tokens=20) == (ref[:STEP + 1], "stop")
    # ignore_eos: past the extra EOS and the tokenizer's, to max_tokens
    done = server.post("completions", prompt=prompt, temperature=0, max_tokens=len(ref), ignore_eos=True,
                       logprobs=0)["choices"][0]
    assert done["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in ref] and done["finish_reason"] == "length"
    assert server.grpc(prompt, max_tokens=len(ref), ignore_eos=True) == (ref, "length")


def test_a_generation_config_folder_gives_its_own_eos_ids(served, answer, tmp_path):
    """vLLM reads the token ids of --generation-config DIR, not the model's."""
    prompt, ref, tokenizer = answer
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ref[STEP]}))
    server = served({"eos_token_id": TOKENIZER_EOS}, "--generation-config", str(folder))
    done = server.post("completions", prompt=prompt, temperature=0, max_tokens=20)["choices"][0]
    assert (done["text"], done["finish_reason"], done["stop_reason"]) == (tokenizer.decode(ref[:STEP]), "stop",
                                                                          ref[STEP])
    # the model's own file alone: the answer runs to the tokenizer's EOS, which is no stop reason
    server = served({"eos_token_id": TOKENIZER_EOS})
    done = server.post("completions", prompt=prompt, temperature=0, max_tokens=20)["choices"][0]
    assert (done["text"], done["finish_reason"], done["stop_reason"]) == (tokenizer.decode(ref[:-1]), "stop", None)
