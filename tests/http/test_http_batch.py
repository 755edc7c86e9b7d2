"""A batch of prompts in one /v1/completions request, as vLLM 0.32 serves it and as
lm-evaluation-harness's ``local-completions`` model sends it with ``batch_size`` > 1: ``prompt`` a
list of texts or of token-id lists, choice j of prompt i at index ``i * n + j`` with seed
``seed + j`` (the same for every prompt), each prompt's echo and logprobs its own, usage summing
the prompts. References: transformers' float64 log_softmax and greedy decoding of each prompt, and
one-prompt one-choice requests; the refusals; echo of a prompt cut by truncate_prompt_tokens."""

from __future__ import annotations

import asyncio
import json
from operator import itemgetter

import httpx2
import pytest
import torch

from admission_harness import CAPPED_KEY, QUOTA, admission_counts, wait_for, write_quota_tenants
from grpc_harness import TENANT_KEYS, server_factory, stop_all
from http_harness import base_url
from test_http_echo_prompt_logprobs import TOL, base_name, post, rows

KEY = TENANT_KEYS["base-co"]
# lm-eval's loglikelihood requests: (context, continuation) of different lengths
PAIRS = [("Question: what is the capital of France?\nAnswer:", " The capital of France is Paris."),
         ("The sky is", " blue."),
         ("Once upon a time, in a village by the sea, there lived an old fisherman who", " had three sons.")]
TEXTS = ["Once upon a time, in a village by the sea,", "The three primary colours are",
         "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
PROMPT = ("The keeper of the lighthouse wrote in his log every evening: the wind, the ships that "
          "passed, the colour of the sea and the birds on the rocks. On the last day of the year he wrote")


def _greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].double().argmax()))
    return ids[len(prompt):]


def _streamed(raw: str) -> dict[int, dict]:
    """index -> the choice a stream's chunks add up to (text, logprobs lists joined, finish_reason)."""
    got: dict[int, dict] = {}
    for line in raw.split("\n\n"):
        if not line.startswith("data: {"):
            continue
        for c in json.loads(line[6:])["choices"]:
            mine = got.setdefault(c["index"], {"text": "", "logprobs": None, "finish_reason": None})
            mine["text"] += c["text"]
            mine["finish_reason"] = c["finish_reason"]
            if c["logprobs"] is not None:
                lps = mine["logprobs"] or {k: [] for k in c["logprobs"]}
                mine["logprobs"] = {k: lps[k] + c["logprobs"][k] for k in lps}
    return got


@pytest.mark.parametrize("tenant,adapter", [("base-co", None), ("tied-co", "inttune-nystrom-tied")])
def test_lm_eval_batched_loglikelihood_request_scores_each_continuation(http_server, tokenizer, hf_model,
                                                                         tenant, adapter):
    contexts = [tokenizer.encode(c, add_special_tokens=False) for c, _ in PAIRS]
    prompts = [ctx + tokenizer.encode(cont, add_special_tokens=False) for ctx, (_, cont) in zip(contexts, PAIRS)]
    assert len({len(p) for p in prompts}) == 3
    # LocalCompletionsAPI._create_payload(generate=False) with batch_size 3 (tokenized_requests)
    payload = {"model": adapter or base_name(http_server), "prompt": prompts, "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    status, body = post(http_server, TENANT_KEYS[tenant], "completions", payload)
    assert status == 200, body
    choices = sorted(body["choices"], key=itemgetter("index"))  # LocalCompletionsAPI.parse_logprobs
    assert [c["index"] for c in choices] == [0, 1, 2]
    for choice, ids, ctx in zip(choices, prompts, contexts):
        lp, want, ctxlen = choice["logprobs"], rows(hf_model, ids, adapter), len(ctx)
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        got = sum(lp["token_logprobs"][ctxlen:-1])
        expected = sum(float(want[p - 1, ids[p]]) for p in range(ctxlen, len(ids)))
        assert got == pytest.approx(expected, abs=TOL * (len(ids) - ctxlen))
        is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                 lp["top_logprobs"][ctxlen:-1]))
        assert is_greedy == all(int(want[p - 1].argmax()) == ids[p] for p in range(ctxlen, len(ids)))
        assert choice["text"].startswith(tokenizer.decode(ids))  # each choice echoes its own prompt
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert body["usage"]["completion_tokens"] == 3


def test_greedy_batch_is_each_prompts_own_answer_whole_and_streamed(http_server, tokenizer, hf_model):
    """Three text prompts, greedy, echo with logprobs: choice i is prompt i's one-prompt answer and
    transformers' greedy continuation of it; the stream's chunks add up to the whole answer, each
    choice's first chunk holding its own prompt."""
    fields = {"model": base_name(http_server), "max_tokens": 6, "temperature": 0, "logprobs": 0, "echo": True,
              "ignore_eos": True}
    status, whole = post(http_server, KEY, "completions", {**fields, "prompt": TEXTS})
    assert status == 200, whole
    by_index = {c["index"]: c for c in whole["choices"]}
    assert sorted(by_index) == [0, 1, 2]
    for i, text in enumerate(TEXTS):
        ids = tokenizer.encode(text)
        _, alone = post(http_server, KEY, "completions", {**fields, "prompt": text})
        mine = by_index[i]
        assert (mine["text"], mine["logprobs"]["tokens"]) == (alone["choices"][0]["text"],
                                                             alone["choices"][0]["logprobs"]["tokens"])
        assert mine["logprobs"]["token_logprobs"][1:] == pytest.approx(
            alone["choices"][0]["logprobs"]["token_logprobs"][1:], abs=TOL)
        assert mine["text"] == text + tokenizer.decode(_greedy(hf_model, ids, 6))
    status, raw = post(http_server, KEY, "completions", {**fields, "prompt": TEXTS, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    assert status == 200
    streamed = _streamed(raw)
    assert sorted(streamed) == [0, 1, 2]
    for i in range(3):
        want = by_index[i]
        assert (streamed[i]["text"], streamed[i]["finish_reason"]) == (want["text"], want["finish_reason"])
        for field in ("tokens", "text_offset"):
            assert streamed[i]["logprobs"][field] == want["logprobs"][field]
    usage = json.loads([line for line in raw.split("\n\n") if line.startswith("data: {")][-1][6:])["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (sum(len(tokenizer.encode(t)) for t in TEXTS), 18)
    # the whole response's usage has vLLM's completion_tokens_details (null); its usage chunk has none
    assert usage == ({k: v for k, v in whole["usage"].items() if k != "completion_tokens_details"}
                     | {"prompt_tokens_details": usage["prompt_tokens_details"]})


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_n_choices_of_each_prompt_are_indexed_i_times_n_plus_j_with_seed_plus_j(http_server, tokenizer, stream):
    """2 prompts x n=2, seed 7: index i * n + j is prompt i's one-choice answer with seed 7 + j
    (vLLM: every prompt gets the same params, its fan-out seeds child j with seed + j)."""
    fields = {"model": base_name(http_server), "max_tokens": 6, "temperature": 1.0, "top_k": 50,
              "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    prompts = [tokenizer.encode(TEXTS[0]), tokenizer.encode(TEXTS[1])]
    status, answer = post(http_server, KEY, "completions", {**fields, "prompt": prompts, "n": 2, "seed": 7,
                                                            "stream": stream})
    assert status == 200, answer
    got = _streamed(answer) if stream else {c["index"]: c for c in answer["choices"]}
    assert sorted(got) == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        for j in range(2):
            _, alone = post(http_server, KEY, "completions", {**fields, "prompt": prompt, "seed": 7 + j})
            assert got[i * 2 + j]["text"] == alone["choices"][0]["text"], (i, j)
            assert got[i * 2 + j]["logprobs"]["tokens"] == alone["choices"][0]["logprobs"]["tokens"]
    assert got[0]["text"] != got[1]["text"]  # seeds 7 and 8
    if not stream:
        assert answer["usage"]["prompt_tokens"] == len(prompts[0]) + len(prompts[1])
        assert answer["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize("prompt, words", [
    ([], "empty list"),
    (["Hi", [1, 2]], "a list and a text"),
    ([[1, 2], "Hi"], "a list and a text"),
    (["Hi", 5], "a text and an integer"),
    ([[5], []], "prompt[1] is empty"),
    (["Hi", ""], "prompt[1] is empty"),
    ([[5, 6], [7, True]], "prompt[1][1] is a boolean"),
    ([[5, 6], [7, 1.5]], "prompt[1][1] is another value"),
    ([None], "prompt holds null"),
    (5, "prompt is an integer: send a text, token ids, or a list"),  # not "prompt.str: Input should be ..."
    ({"text": "Hi"}, "prompt is an object"),
    (None, "prompt is null"),
    (["Hi"] * 1025, "exceeds the maximum allowed count of 1024"),
    (["Hi"] * 129, "129 prompts x n=2 choices = 258 requests"),  # over --max-queue 256
])
def test_bad_batches_are_refused_naming_prompt(http_server, prompt, words):
    body = {"model": base_name(http_server), "prompt": prompt, "max_tokens": 2, "n": 2, "temperature": 1.0}
    status, answer = post(http_server, KEY, "completions", body)
    assert status == 400 and answer["error"]["param"] == "prompt", answer
    assert words in answer["error"]["message"], answer


@pytest.mark.parametrize("prompt, words", [
    ([[5, 6], list(range(5, 1105))], "prompt[1]: This model's maximum context length is 1024 tokens"),
    ([[5, 6], [7], [8, 10 ** 6]], "prompt[2] token ids must be in [0, "),  # not "prompt[2]: prompt token ids"
])
def test_a_bad_prompt_of_a_batch_is_named_and_nothing_runs(http_server, prompt, words):
    body = {"model": base_name(http_server), "prompt": prompt, "max_tokens": 100, "temperature": 0}
    status, answer = post(http_server, KEY, "completions", body)
    assert status == 400 and answer["error"]["param"] == "prompt" and words in answer["error"]["message"], answer
    stats = http_server.engine.stats
    assert wait_for(lambda: (stats()["running"], stats()["waiting"], stats()["kv_blocks_used"]) == (0, 0, 0))
    assert admission_counts(http_server) == (0, {})


@pytest.mark.parametrize("message, param, named", [
    ("prompt is empty: need at least one token", "prompt", "prompt[1] is empty: need at least one token"),
    ("prompt is not valid Unicode text: surrogates not allowed at character 3", None,
     "prompt[1] is not valid Unicode text: surrogates not allowed at character 3"),
    ("This model's maximum context length is 1024 tokens.", None, "prompt[1]: This model's maximum context length "
     "is 1024 tokens."),
    ("stop_token_ids must be in [0, 49152); got 49152", "stop_token_ids",
     "prompt[1]: stop_token_ids must be in [0, 49152); got 49152"),
])
def test_a_batch_prompts_refusal_names_it_once(message, param, named):
    """The engine's refusal of one prompt of a batch, named: it read "prompt[1]: prompt is empty: ..."."""
    from nlora_serve.engine.sample.sampling import RequestError
    from nlora_serve.serving.http_api.choices import of_prompt

    refused = of_prompt(RequestError(message, param), 1, 3)
    assert (str(refused), refused.param) == (named, param or "prompt")


def test_a_batch_holds_a_place_per_prompt_and_choice(base_fp32, tokenizer, tmp_path):
    """capped-co may hold QUOTA (2) requests: 3 prompts could never be admitted (400 naming
    prompt), 2 prompts are; beside a running request of its own, 2 prompts are not free now (429)."""
    make, running = server_factory(base_fp32, tokenizer, tmp_path)
    try:
        server = make(write_quota_tenants(tmp_path / "tenants.json"), http_port=0)
        body = {"model": base_name(server), "max_tokens": 1, "temperature": 0}
        status, answer = post(server, CAPPED_KEY, "completions", {**body, "prompt": ["Hi", "Yo", "Hey"]})
        assert status == 400 and answer["error"]["param"] == "prompt", answer
        assert "3 prompts x n=1" in answer["error"]["message"] and "max_concurrent_requests 2" in \
            answer["error"]["message"]
        status, answer = post(server, CAPPED_KEY, "completions", {**body, "prompt": ["Hi", "Yo"]})
        assert status == 200 and len(answer["choices"]) == QUOTA

        async def beside_a_running_one():
            async with httpx2.AsyncClient(timeout=60) as http:
                long = {**body, "prompt": "Hi", "max_tokens": 500, "ignore_eos": True, "stream": True}
                async with http.stream("POST", f"{base_url(server)}/completions", json=long,
                                       headers={"Authorization": f"Bearer {CAPPED_KEY}"}) as reply:
                    lines = reply.aiter_lines()  # held open: leaving an `async for` would close the stream
                    while not (await anext(lines)).startswith("data: {"):
                        pass
                    return await http.post(f"{base_url(server)}/completions", json={**body, "prompt": ["Hi", "Yo"]},
                                           headers={"Authorization": f"Bearer {CAPPED_KEY}"})

        refused = asyncio.run(beside_a_running_one())
        assert refused.status_code == 429, refused.text
        assert wait_for(lambda: admission_counts(server) == (0, {}) and server.engine.stats()["kv_blocks_used"] == 0)
    finally:
        stop_all(running)


def test_a_dropped_batch_stream_aborts_every_prompt(make_http_server):
    server = make_http_server()

    async def drop():
        body = {"model": base_name(server), "prompt": TEXTS, "max_tokens": 1000, "temperature": 0, "stream": True,
                "ignore_eos": True}
        async with httpx2.AsyncClient(timeout=60) as http:
            async with http.stream("POST", f"{base_url(server)}/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) as reply:
                seen = set()
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        seen.add(json.loads(line[6:])["choices"][0]["index"])
                        # the three prompts run as the tenant's three sequences
                        assert server.engine.stats()["running"] + server.engine.stats()["waiting"] <= 3
                    if len(seen) == 3:
                        break
        return seen

    assert asyncio.run(drop()) == {0, 1, 2}
    assert wait_for(lambda: server.engine.stats()["running"] == server.engine.stats()["waiting"] == 0
                    and server.engine.stats()["kv_blocks_used"] == 0 and admission_counts(server) == (0, {}))


@pytest.mark.parametrize("prompt_kind", ["text", "ids"])
def test_echo_with_truncate_prompt_tokens_echoes_the_prompt_as_it_ran(http_server, tokenizer, hf_model, prompt_kind):
    """The kept tokens decoded (the text's tail, for side left), their logprobs the transformers
    model's over the kept ids; a prompt shorter than k echoes as sent."""
    full = tokenizer.encode(PROMPT)
    kept = full[-12:]
    body = {"model": base_name(http_server), "prompt": PROMPT if prompt_kind == "text" else full, "echo": True,
            "max_tokens": 1, "logprobs": 0, "temperature": 0, "truncate_prompt_tokens": 12}
    status, answer = post(http_server, KEY, "completions", body)
    assert status == 200, answer
    choice = answer["choices"][0]
    echoed = tokenizer.decode(kept)
    assert PROMPT.endswith(echoed) and len(echoed) < len(PROMPT)
    assert choice["text"] == echoed + choice["logprobs"]["tokens"][-1]
    assert choice["logprobs"]["tokens"][:12] == [tokenizer.decode([t]) for t in kept]
    want = rows(hf_model, kept)
    for p in range(1, 12):
        assert choice["logprobs"]["token_logprobs"][p] == pytest.approx(float(want[p - 1, kept[p]]), abs=TOL)
    assert answer["usage"]["prompt_tokens"] == 12
    status, whole = post(http_server, KEY, "completions", {**body, "prompt": PROMPT, "truncate_prompt_tokens": 1000})
    assert status == 200 and whole["choices"][0]["text"].startswith(PROMPT)


@pytest.mark.parametrize("truncate, max_tokens", [(None, 4), (1024, 100)])
def test_a_batch_is_refused_at_its_first_prompt_over_the_context_before_the_rest_are_tokenized(
        http_server, tokenizer, monkeypatch, truncate, max_tokens):
    """The context rule is applied to each prompt as soon as it is tokenized (and cut): a batch of
    long texts is refused at its first, not after the tokenizer has worked through all of them."""
    engine, tokenized = http_server.engine, []

    def counting(prompt, *args, **kwargs):
        tokenized.append(prompt)
        return type(engine).prompt_ids(engine, prompt, *args, **kwargs)

    monkeypatch.setattr(engine, "prompt_ids", counting)
    long = " ".join(f"w{i}" for i in range(1500))  # > 1024 tokens, under the bytes refused untokenized
    body = {"model": base_name(http_server), "prompt": ["Hi", long, long, "Hello"], "max_tokens": max_tokens,
            "temperature": 0}
    if truncate is not None:
        body["truncate_prompt_tokens"] = truncate  # 1024 kept: no room left to generate (max_tokens is lowered)
    status, answer = post(http_server, KEY, "completions", body)
    assert status == 400 and answer["error"]["param"] == "prompt", answer
    asked = len(tokenizer.encode(long)) if truncate is None else truncate
    assert answer["error"]["message"].startswith(f"prompt[1]: This model's maximum context length is 1024 tokens. "
                                                 f"However, you requested {asked} tokens in the messages"), answer
    assert tokenized == ["Hi", long]  # prompt[2] and prompt[3] never took the tokenizer
    stats = engine.stats
    assert wait_for(lambda: (stats()["running"], stats()["waiting"], stats()["kv_blocks_used"]) == (0, 0, 0))
    assert admission_counts(http_server) == (0, {})
