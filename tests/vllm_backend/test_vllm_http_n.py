"""OpenAI's ``n`` over ``serve --backend vllm``: the HTTP front end runs each choice as a vLLM
request of its own with ``seed + i``, the rule of vLLM's own fan-out (v1/engine/parallel_sampling.py),
so choice i is the answer of a one-choice request with that seed, and usage counts the prompt once.
Runs only where vllm is importable (see conftest.py)."""

from __future__ import annotations

import openai
import pytest
import torch

from grpc_harness import TENANT_KEYS, RunningServer
from nlora_serve.adapters.manager import AdapterLimits
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server_config import ServerConfig

PROMPT = "Once upon a time, in a village by the sea,"


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key=key, max_retries=0,
                         timeout=300)


@pytest.fixture(scope="module")
def server(base_fp32, tenants_file, tmp_path_factory):
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig
    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    config = EngineConfig(dtype=torch.float32, adapter_dir=str(tmp_path_factory.mktemp("store")),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512),
                          adapter_limits=AdapterLimits(max_rank=16))
    engine = VllmEngine(config, VllmBackendConfig(max_loras=1), base_fp32)
    serve_config = ServerConfig(port=0, http_port=0, tenants_file=str(tenants_file))
    running = RunningServer(engine, serve_config, Authenticator.from_file(tenants_file),
                            server_info(base_fp32, config, serve_config, backend="vllm"), base_fp32.tokenizer())
    yield running
    running.stop()
    engine.shutdown()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_seeded_choices_are_vllms_one_choice_answers_of_seed_plus_i(server, base_fp32, stream):
    api = client(server, TENANT_KEYS["base-co"])
    base = server.server.generation.info.model
    fields = dict(model=base, prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    answer = api.completions.create(n=3, seed=21, stream=stream, **fields)
    got: dict[int, str] = {}
    for chunk in (answer if stream else [answer]):
        for choice in chunk.choices:
            got[choice.index] = got.get(choice.index, "") + choice.text
    want = {i: api.completions.create(seed=21 + i, **fields).choices[0].text for i in range(3)}
    assert got == want and len(set(got.values())) > 1
    if not stream:
        prompt = len(base_fp32.tokenizer().encode(PROMPT))
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, 18)
    assert server.engine.stats()["running"] == 0


def test_greedy_n_is_refused_as_vllm_refuses_it(server):
    with pytest.raises(openai.BadRequestError) as err:
        client(server, TENANT_KEYS["base-co"]).completions.create(
            model=server.server.generation.info.model, prompt=PROMPT, n=2, max_tokens=2, temperature=0)
    assert err.value.body["param"] == "n" and "greedy" in err.value.body["message"]
