"""OpenAI's ``n`` as vLLM 0.32 serves it: n choices indexed 0..n-1, each an engine request of its
own; with a ``seed`` choice i is the answer of a one-choice request with ``seed + i`` (V1's
ParentRequest); usage counts the prompt once and every choice's completion tokens; n > 1 with
greedy sampling and ``best_of`` != n are refused, as vLLM refuses the one and drops the other.
Each choice's tokens are checked against the transformers model too (float64 logprobs)."""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest
import torch

from admission_harness import CAPPED_KEY, QUOTA, admission_counts, wait_for, write_quota_tenants
from grpc_harness import TENANT_KEYS, server_factory, stop_all
from http_harness import base_url, client, scrape
from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.auth import Principal
from nlora_serve.serving.status import QueueFull

KEY = TENANT_KEYS["base-co"]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
PROMPT = "Once upon a time, in a village by the sea,"
PREFIX = ("The keeper of the lighthouse wrote in his log every evening: the wind, the ships that "
          "passed, the colour of the sea and the birds on the rocks. On the last day of the year he wrote")


def _base(server) -> str:
    return server.server.generation.info.model


def _create(server, chat: bool, **fields):
    api = client(server, KEY)
    if chat:
        return api.chat.completions.create(model=_base(server), messages=POEM, logprobs=True, **fields)
    return api.completions.create(model=_base(server), prompt=PROMPT, logprobs=0, **fields)


def _tokens(choice_logprobs, chat: bool) -> list[int]:
    tokens = [e.token for e in choice_logprobs.content] if chat else choice_logprobs.tokens
    return [int(t.removeprefix("token_id:")) for t in tokens]


def _choices(answer, chat: bool, stream: bool) -> dict[int, tuple[str, list[int], str]]:
    """index -> (text, token ids, finish_reason) of a whole answer or of a stream's chunks."""
    if not stream:
        return {c.index: (c.message.content if chat else c.text, _tokens(c.logprobs, chat), c.finish_reason)
                for c in answer.choices}
    got: dict[int, tuple[str, list[int], str]] = {}
    for chunk in answer:
        for c in chunk.choices:
            text, tokens, _ = got.get(c.index, ("", [], None))
            piece = (c.delta.content or "") if chat else c.text
            got[c.index] = (text + piece, tokens + (_tokens(c.logprobs, chat) if c.logprobs else []), c.finish_reason)
    return got


_LOGPROBS: dict[tuple[int, ...], list[float]] = {}  # the reference's, by prompt + tokens (the model is one)


def _logprobs(hf_model, prompt: list[int], tokens: list[int]) -> list[float]:
    """The transformers model's (float64) logprob of each of ``tokens`` after ``prompt`` and the
    tokens before it: one causal forward over them all (the whole and streamed cases ask for the
    same choices)."""
    key = tuple(prompt + tokens)
    if key not in _LOGPROBS:
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].double()
        _LOGPROBS[key] = logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    return _LOGPROBS[key]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_seeded_choices_are_the_one_choice_answers_of_seed_plus_i(http_server, tokenizer, hf_model, chat, stream):
    """n=3, seed 11: choice i equals the n=1 answer with seed 11 + i (vLLM's per-child seed), stop
    string and logprobs included; the choices differ (different seeds); each choice's logprobs are
    the transformers model's (float64) for its own continuation of the prompt."""
    fields = dict(max_tokens=8, temperature=1.0, stop=["\n\n"],
                  extra_body={"return_tokens_as_token_ids": True, "top_k": 50})
    first = _create(http_server, chat, n=3, seed=11, stream=stream, **fields)
    got = _choices(first, chat, stream)
    want = {i: _choices(_create(http_server, chat, seed=11 + i, **fields), chat, False)[0] for i in range(3)}
    assert got == want
    assert len({tuple(tokens) for _, tokens, _ in got.values()}) > 1
    if chat:
        prompt = tokenizer.apply_chat_template(POEM, tokenize=True, add_generation_prompt=True, return_dict=False)
    else:
        prompt = tokenizer.encode(PROMPT)
    # the whole answer's logprobs (the whole case's first answer is that request's)
    answer = first if not stream else _create(http_server, chat, n=3, seed=11, **fields)
    for choice in answer.choices[:2]:
        entries = choice.logprobs.content if chat else None
        tokens = _tokens(choice.logprobs, chat)
        values = [e.logprob for e in entries] if chat else choice.logprobs.token_logprobs
        reference = _logprobs(hf_model, prompt, tokens)
        for k in (0, len(tokens) - 1):
            assert values[k] == pytest.approx(reference[k], abs=1e-3)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_usage_counts_the_prompt_once_and_every_choices_tokens(http_server, tokenizer, chat):
    """vLLM's usage for n > 1, whole and in the include_usage chunk; chat streams open with one role
    chunk per choice; continuous usage is the chunk's own choice's, as vLLM's."""
    prompt = (len(tokenizer.apply_chat_template(POEM, tokenize=True, add_generation_prompt=True, return_dict=False))
              if chat else len(tokenizer.encode(PROMPT)))
    fields = dict(n=4, max_tokens=5, temperature=1.0, seed=3, extra_body={"min_tokens": 5})
    whole = _create(http_server, chat, **fields)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2, 3]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (prompt, 20, prompt + 20)
    chunks = list(_create(http_server, chat, stream=True, stream_options={"include_usage": True,
                                                                         "continuous_usage_stats": True}, **fields))
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (prompt, 20)
    made = [0] * 4
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        lps = choice.logprobs
        made[choice.index] += len(lps.content if chat else lps.tokens) if lps else 0
        assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (prompt, made[choice.index])
    if chat:
        assert [c.choices[0].index for c in chunks[:4]] == [0, 1, 2, 3]
        assert all(c.choices[0].delta.role == "assistant" for c in chunks[:4])
    assert http_server.engine.stats()["kv_blocks_used"] == 0


def test_choices_without_a_seed_are_independent_draws(http_server):
    answer = client(http_server, KEY).completions.create(model=_base(http_server), prompt=PROMPT, n=4, max_tokens=8,
                                                         temperature=1.5, extra_body={"ignore_eos": True})
    assert len({c.text for c in answer.choices}) > 1  # all four alike: p < 1e-6 at this temperature


def test_the_other_choices_read_the_prompt_from_the_prefix_cache(make_http_server):
    """Choice 0 prefills the prompt; the others start once its blocks are committed, so each reads
    every full block from the cache (queued together they would all prefill it)."""
    server = make_http_server(metrics_port=0)
    n_prompt = len(server.engine.prompt_ids(PREFIX))
    full = (n_prompt - 1) // 16 * 16
    answer = client(server, KEY).completions.create(model=_base(server), prompt=PREFIX, n=3, max_tokens=2,
                                                    temperature=1.0, seed=0)
    assert answer.usage.prompt_tokens == n_prompt and answer.usage.prompt_tokens_details.cached_tokens == 0
    samples = scrape(server)
    http = (("frontend", "http"),)
    assert samples[("nlora_prefix_cache_queries_total", http)] == 3 * n_prompt
    assert samples[("nlora_prefix_cache_hits_total", http)] == 2 * full


def test_n_over_max_num_seqs_runs_in_waves_and_holds_n_places(make_http_server):
    """n=5 on an engine running 2 sequences at most: all five finish; while they run the request
    holds five places of --max-queue 6, so a second request of n=2 gets 429."""
    server = make_http_server(max_num_seqs=2, max_queue=6)
    api = client(server, KEY)
    stream = api.completions.create(model=_base(server), prompt=PROMPT, n=5, max_tokens=24, temperature=1.0,
                                    stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    # five sequences of the tenant in the engine (what its fair scheduler sees), two at a time
    assert wait_for(lambda: (server.engine.stats()["running"], server.engine.stats()["waiting"]) == (2, 3))
    assert admission_counts(server) == (5, {"base-co": 5})
    with pytest.raises(openai.RateLimitError):
        api.completions.create(model=_base(server), prompt="Hi", n=2, max_tokens=1, temperature=1.0)
    assert api.completions.create(model=_base(server), prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in [first, *chunks] if c.choices[0].finish_reason}
    assert finished == {i: "length" for i in range(5)}
    assert wait_for(lambda: server.engine.stats()["kv_blocks_used"] == 0 and admission_counts(server) == (0, {}))


def test_a_dropped_stream_aborts_every_choice(http_server):
    server = http_server  # the module's: left idle, as checked below

    async def drop():
        body = {"model": _base(server), "prompt": PROMPT, "n": 3, "max_tokens": 1000, "temperature": 1.0,
                "stream": True, "ignore_eos": True}
        async with httpx2.AsyncClient(timeout=60) as http:
            async with http.stream("POST", f"{base_url(server)}/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) as reply:
                seen = set()
                async for line in reply.aiter_lines():
                    if line.startswith("data: {"):
                        seen.add(line.split('"index":')[1].split(",")[0])
                    if len(seen) == 3:
                        break
        return seen

    assert asyncio.run(drop()) == {"0", "1", "2"}
    assert wait_for(lambda: server.engine.stats()["running"] == server.engine.stats()["waiting"] == 0
                    and server.engine.stats()["kv_blocks_used"] == 0 and admission_counts(server) == (0, {}))


def test_n_above_the_tenants_concurrency_limit_is_400_naming_n(base_fp32, tokenizer, tmp_path):
    """capped-co may hold QUOTA (2) requests: n=3 could never be admitted (400, not 429 or a hang);
    n=2 is."""
    make, running = server_factory(base_fp32, tokenizer, tmp_path)
    try:
        server = make(write_quota_tenants(tmp_path / "tenants.json"), http_port=0)
        api = client(server, CAPPED_KEY)
        with pytest.raises(openai.BadRequestError) as err:
            api.completions.create(model=_base(server), prompt="Hi", n=QUOTA + 1, max_tokens=1, temperature=1.0)
        assert err.value.body["param"] == "n" and "max_concurrent_requests 2" in err.value.body["message"]
        answer = api.completions.create(model=_base(server), prompt="Hi", n=QUOTA, max_tokens=1, temperature=1.0)
        assert len(answer.choices) == QUOTA and admission_counts(server) == (0, {})
    finally:
        stop_all(running)


@pytest.mark.parametrize("fields, param, words", [
    ({"n": 0}, "n", "at least 1"),
    ({"n": -1}, "n", "at least 1"),
    ({"n": 257}, "n", "--max-queue 256"),
    ({"n": True}, "n", "integer"),  # strict: JSON's true is no number
    ({"n": 2, "temperature": 0}, "n", "greedy"),  # vLLM: n must be 1 when using greedy sampling
    ({"n": 2, "best_of": 3}, "best_of", "best_of = n"),
    ({"best_of": 2}, "best_of", "best_of = n"),
    ({"n": 3, "seed": (1 << 64) - 2}, "seed", "seed + n - 1"),
])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_bad_n_is_refused_naming_the_field(http_server, chat, fields, param, words):
    path = "/chat/completions" if chat else "/completions"
    body = {"model": _base(http_server), "max_tokens": 2, "temperature": 1.0, **fields,
            **({"messages": POEM} if chat else {"prompt": PROMPT})}
    reply = httpx2.post(base_url(http_server) + path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert words in reply.json()["error"]["message"], reply.text


def test_best_of_equal_to_n_is_accepted(http_server):
    answer = client(http_server, KEY).completions.create(model=_base(http_server), prompt="Hi", n=2, best_of=2,
                                                         max_tokens=2, temperature=1.0, seed=1)
    assert sorted(c.index for c in answer.choices) == [0, 1]


def test_choices_take_queue_places_as_one_request_each():
    """Admission.grow counts n - 1 more places under the same rules as n requests one by one
    (Choudhury-Hahne share: alone, a weight-1 tenant gets 4 of 8 places): 4 is admitted, 5 could
    never be (400 naming n); beside another tenant's 2, the third place is its last (429 for a fourth)."""
    admission = Admission(8, tenant_shares=True)
    tenant, other = Principal("t", False), Principal("o", False)
    four = admission.reserve(tenant)
    admission.grow(four, 3, tenant)
    assert (admission.inflight, admission.held) == (4, {"t": 4})
    four.release()
    with pytest.raises(RequestError) as err:
        admission.grow(admission.reserve(tenant), 4, tenant)
    assert err.value.param == "n" and str(err.value) == (  # it read "more than 't''s share": a doubled quote
        "n=5 is 5 requests: more than tenant 't' could ever hold in its share of the queue (--max-queue 8, weight 1): "
        "each choice of each prompt is a request running or waiting")
    capped, quota = Principal("bob", False, max_concurrent_requests=2), Admission(8)
    with pytest.raises(RequestError) as err:
        quota.grow(quota.reserve(capped), 2, capped, "3 prompts x n=1", "prompt")
    assert err.value.param == "prompt" and str(err.value) == (
        "3 prompts x n=1 is 3 requests: more than tenant 'bob' may have at once (its max_concurrent_requests 2 in the "
        "tenants file; each choice of each prompt is a request running or waiting)")
    admission = Admission(8, tenant_shares=True)
    admission.grow(admission.reserve(other), 1, other)
    three = admission.reserve(tenant)
    with pytest.raises(QueueFull, match="its share"):  # the fourth: 1 + 2 >= 1 x (8 - 3 - 2)
        admission.grow(three, 3, tenant)
    admission.grow(three, 2, tenant)  # the third: 1 + 1 < 1 x (8 - 3 - 1)
    assert (admission.inflight, admission.held) == (5, {"o": 2, "t": 3})
