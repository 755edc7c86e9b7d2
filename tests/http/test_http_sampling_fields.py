"""Sampling fields of the OpenAI API against their OpenAI / vLLM definitions, written out here over
the transformers model (float64 logits): what the server computes for them, not only that it
accepts them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from grpc_harness import TENANT_KEYS
from http_harness import client, idle

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


def _base(server) -> str:
    return server.server.generation.info.model


def _chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


_LOGITS: dict[tuple[int, ...], torch.Tensor] = {}  # the reference's logits by token ids (the model is one)
_LATEST: list = []  # [(ids, transformers KV cache)] of the latest forward, which a greedy step extends


def _raw_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """[V] float64 next-token logits of the transformers reference (a fresh copy: callers add to it;
    the whole / streamed cases and the greedy references ask for the same ids). One token past the
    latest forward, transformers' own KV cache feeds that token alone (as its generate does; the
    logits agree with a whole forward's to ~5e-5): a greedy reference is one forward, not n."""
    key = tuple(ids)
    if key not in _LOGITS:
        with torch.no_grad():
            if _LATEST and _LATEST[0][0] == key[:-1]:
                out = hf_model(torch.tensor([key[-1:]]), cache=_LATEST[0][1], use_cache=True)
            else:
                out = hf_model(torch.tensor([ids]), use_cache=True)
        _LOGITS[key] = out.logits[0, -1].double()
        _LATEST[:] = [(key, out.cache)]
    return _LOGITS[key].clone()


def _vllm_greedy(hf_model, prompt: list[int], n: int, logit_bias: dict[int, float],
                 repetition_penalty: float = 1.0, bias_first: bool = True) -> list[int]:
    """vLLM's sampler at temperature 0 (v1 Sampler.forward): logit_bias added to the raw logits,
    then the repetition penalty over prompt and output tokens (divide positive logits, multiply the
    others), then argmax. ``bias_first=False``: the other order, for a control."""
    ids = list(prompt)
    for _ in range(n):
        logits = _raw_logits(hf_model, ids)
        bias = torch.zeros_like(logits)
        for token, value in logit_bias.items():
            bias[token] = value
        logits += bias if bias_first else 0.0
        seen = torch.tensor(sorted(set(ids)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition_penalty,
                                   logits[seen] * repetition_penalty)
        logits += 0.0 if bias_first else bias
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_logit_bias_is_added_to_the_raw_logits_before_the_penalties(http_server, tokenizer, hf_model,
                                                                   repetition_penalty):
    """Greedy under logit_bias (keys are token ids as strings, OpenAI's form) gives vLLM's tokens;
    the logprobs stay those of the model's raw distribution (vLLM's default raw_logprobs)."""
    prompt = _chat_ids(tokenizer, POEM)
    first = int(_raw_logits(hf_model, prompt).argmax())
    sea = tokenizer.encode(" sea", add_special_tokens=False)[0]
    bias = {first: -100.0, sea: 8.0}  # ban the unbiased first token, favour " sea" (in the prompt)
    n = 8
    answer = client(http_server, TENANT_KEYS["base-co"]).chat.completions.create(
        model=_base(http_server), messages=POEM, max_tokens=n, temperature=0, logprobs=True, top_logprobs=0,
        logit_bias={str(t): b for t, b in bias.items()},
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True,
                    "repetition_penalty": repetition_penalty})
    entries = answer.choices[0].logprobs.content
    got = [int(e.token.removeprefix("token_id:")) for e in entries]
    want = _vllm_greedy(hf_model, prompt, n, bias, repetition_penalty)
    assert got == want and first not in got
    if repetition_penalty == 1.0:
        assert sea in got
    else:  # the case tells the orders apart: penalised after its bias, " sea" loses
        assert want != _vllm_greedy(hf_model, prompt, n, bias, repetition_penalty, bias_first=False)
    for i, entry in enumerate(entries):
        raw = _raw_logits(hf_model, prompt + got[:i]).log_softmax(-1)
        assert entry.logprob == pytest.approx(float(raw[got[i]]), abs=1e-3)


@pytest.mark.parametrize("logit_bias, words", [
    ({"x": 1}, "token ids"),
    ({"-3": 1}, "token ids"),
    ({"49152": 1}, r"[0, 49152)"),  # past the vocabulary
    ({"5": 100.5}, "[-100, 100]"),
    ({"5": 1, "05": 2}, "distinct"),
])
def test_bad_logit_bias_is_refused_naming_it(http_server, logit_bias, words):
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, TENANT_KEYS["base-co"]).completions.create(
            model=_base(http_server), prompt="Hi", max_tokens=2, logit_bias=logit_bias)
    assert err.value.body["param"] == "logit_bias" and words in err.value.body["message"]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_min_p_keeps_the_tokens_vllm_keeps_after_temperature(http_server, tokenizer, hf_model, temperature):
    """vLLM's min_p (MinPLogitsProcessor, after temperature): a token is kept iff its probability is
    at least min_p times the most likely one's. Here min_p 0.5 keeps 3 first tokens at temperature
    1 and 2 at 0.7 (no token within 2 % of the floor: float32 cannot tip one over); 40 seeded draws
    reach all of them (each misses with p < 1e-4) and nothing else."""
    prompt = "My favourite colour is"
    probs = (_raw_logits(hf_model, tokenizer.encode(prompt)) / temperature).softmax(-1)
    ratio = probs / probs.max()
    keep = {int(t) for t in torch.nonzero(ratio >= 0.5)}
    assert len(keep) == {1.0: 3, 0.7: 2}[temperature] and not ((ratio - 0.5).abs() < 0.01).any()
    api = client(http_server, TENANT_KEYS["base-co"])

    def draw(seed: int) -> int:
        answer = api.completions.create(model=_base(http_server), prompt=prompt, max_tokens=1, seed=seed,
                                        temperature=temperature, logprobs=0,
                                        extra_body={"min_p": 0.5, "return_tokens_as_token_ids": True})
        return int(answer.choices[0].logprobs.tokens[0].removeprefix("token_id:"))
    with ThreadPoolExecutor(8) as pool:  # sent 8 at a time: the engine batches them
        drawn = set(pool.map(draw, range(40)))
    assert drawn == keep


@pytest.mark.parametrize("min_p", [-0.1, 1.5])
def test_min_p_out_of_range_is_refused(http_server, min_p):
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, TENANT_KEYS["base-co"]).completions.create(
            model=_base(http_server), prompt="Hi", max_tokens=2, extra_body={"min_p": min_p})
    assert err.value.body["param"] == "min_p" and "[0, 1]" in err.value.body["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("include", [False, True], ids=["excluded", "included"])
def test_include_stop_str_in_output_keeps_the_stop_string_and_token(http_server, tokenizer, hf_model, stream, include):
    """vLLM's include_stop_str_in_output: the text ends after the stop string (spanning token
    boundaries here: " ocean" "," " a") instead of before it, and a stop token's text is kept;
    false (the default) leaves both out. The reference text is the transformers greedy decode."""
    prompt = _chat_ids(tokenizer, POEM)
    free = tokenizer.decode(_vllm_greedy(hf_model, prompt, 12, {}))
    comma = tokenizer.encode(",", add_special_tokens=False)[0]
    api = client(http_server, TENANT_KEYS["base-co"])
    for fields, cut in (({"stop": ["n, a"]}, free.index("n, a") + (4 if include else 0)),
                        ({"extra_body": {"stop_token_ids": [comma]}}, free.index(",") + (1 if include else 0))):
        extra = {**fields.get("extra_body", {}), "include_stop_str_in_output": include}
        answer = api.chat.completions.create(model=_base(http_server), messages=POEM, max_tokens=12, temperature=0,
                                             stream=stream, stop=fields.get("stop"), extra_body=extra)
        if stream:
            chunks = [c.choices[0] for c in answer]
            text, reason = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
        else:
            text, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (text, reason) == (free[:cut], "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("skip", [True, False], ids=["skipped", "kept"])
def test_skip_special_tokens_false_keeps_their_text(http_server, tokenizer, hf_model, stream, skip):
    """vLLM's skip_special_tokens: with ignore_eos the model writes '<|im_end|>' and goes on; the
    text is the tokenizer's decode of the transformers greedy tokens with the same flag."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = _vllm_greedy(hf_model, _chat_ids(tokenizer, messages), 10, {})
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in want  # the case: a special token mid-answer
    answer = client(http_server, TENANT_KEYS["base-co"]).chat.completions.create(
        model=_base(http_server), messages=messages, max_tokens=10, temperature=0, stream=stream,
        extra_body={"ignore_eos": True, "skip_special_tokens": skip})
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in answer)
    else:
        text = answer.choices[0].message.content
    assert text == tokenizer.decode(want, skip_special_tokens=skip)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_reason_names_the_stop_string_or_token_as_vllm(http_server, tokenizer, hf_model, stream):
    """vLLM's stop_reason on a choice: the stop string that ended the text (of several, the one
    found first in it), the stop token id, or null after EOS or max_tokens; in a chat stream on the
    finishing chunk only (vLLM's other chunks leave it unset: exclude_unset); the greedy text
    (transformers) decides which."""
    prompt = _chat_ids(tokenizer, POEM)
    free = tokenizer.decode(_vllm_greedy(hf_model, prompt, 12, {}))
    comma = tokenizer.encode(",", add_special_tokens=False)[0]
    france = [{"role": "user", "content": "What is the capital of France?"}]  # greedy: ends with EOS
    api = client(http_server, TENANT_KEYS["base-co"])
    cases = [(POEM, {"stop": ["zzz", "tapestry", "n, a"]}, "stop", "n, a"),
             (POEM, {"extra_body": {"stop_token_ids": [comma]}}, "stop", comma),
             (france, {}, "stop", None),
             (POEM, {}, "length", None)]
    assert free.index("n, a") < free.index("tapestry")

    def choices_of(case):
        messages, fields = case[:2]
        answer = api.chat.completions.create(model=_base(http_server), messages=messages, max_tokens=12,
                                             temperature=0, stream=stream, **fields)
        return [c.choices[0] for c in answer] if stream else [answer.choices[0]]
    with ThreadPoolExecutor(len(cases)) as pool:  # sent together: the engine batches them
        answers = list(pool.map(choices_of, cases))
    for (messages, fields, finish, stop_reason), choices in zip(cases, answers):
        assert choices[-1].finish_reason == finish
        assert [getattr(c, "stop_reason", "unset") for c in choices] == ["unset"] * (len(choices) - 1) + [stop_reason]


def test_continuous_usage_stats_puts_the_usage_so_far_on_every_chunk(http_server, tokenizer):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries the
    usage so far: the chat template's prompt tokens, 0 completion tokens on the role chunk, then
    the tokens streamed so far (counted from the chunks' logprobs entries); the last chunk the whole."""
    answer = client(http_server, TENANT_KEYS["base-co"]).chat.completions.create(
        model=_base(http_server), messages=POEM, max_tokens=6, temperature=0, stream=True, logprobs=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
    chunks = list(answer)
    prompt = len(_chat_ids(tokenizer, POEM))
    made, want = 0, []
    for chunk in chunks[:-1]:
        made += len(chunk.choices[0].logprobs.content) if chunk.choices[0].logprobs else 0
        want.append((prompt, made, prompt + made))
    assert [(c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) for c in chunks[:-1]] == want
    assert want[0][1] == 0 and made == 6 and chunks[-1].choices == []
    assert (chunks[-1].usage.completion_tokens, chunks[-1].usage.prompt_tokens) == (6, prompt)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_stop_string_waits_for_min_tokens(http_server, tokenizer, stream):
    """stop [" "] with min_tokens 4 cuts at the first space ending past the text of the first 4
    tokens (vLLM's rule); the reference cut is computed by hand from a greedy run without stop."""
    api = client(http_server, TENANT_KEYS["base-co"])
    common = dict(model=_base(http_server), prompt="Hello there", max_tokens=8, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    free = api.completions.create(**common).choices[0]
    ids = [int(t.removeprefix("token_id:")) for t in free.logprobs.tokens]
    boundary = len(tokenizer.decode(ids[:4]))
    assert " " in free.text[:boundary]  # a space within the first 4 tokens' text: the case of the defect
    common["extra_body"]["min_tokens"] = 4
    answer = api.completions.create(**common, stop=[" "], stream=stream)
    chunks = list(answer) if stream else [answer]
    text = "".join(c.choices[0].text for c in chunks)
    assert text == free.text[:free.text.index(" ", boundary)] and chunks[-1].choices[0].finish_reason == "stop"
    assert idle(http_server)


def test_top_k_minus_one_is_off_as_in_vllm(http_server):
    """top_k -1 (what LangChain's VLLMOpenAI sends by default) and 0 sample as top_k unset: the
    same seeded tokens; top_k 1 (greedy) is the control that top_k reaches the sampler at all."""
    api = client(http_server, TENANT_KEYS["base-co"])
    common = dict(model=_base(http_server), prompt="Once upon a time", max_tokens=12, temperature=1.5, seed=7,
                  logprobs=0)

    def tokens(**extra) -> list[str]:
        return api.completions.create(**common, extra_body={"ignore_eos": True, **extra}).choices[0].logprobs.tokens

    unset = tokens()
    assert tokens(top_k=-1) == tokens(top_k=0) == unset
    assert tokens(top_k=1) != unset


def test_a_negative_seed_is_taken_as_vllm_takes_it(http_server):
    """vLLM takes any int64 seed, and UIs send -1: it seeds a generator as torch reads it (two's
    complement: -1 is 2^64 - 1), the same tokens each time; another seed is the control."""
    api = client(http_server, TENANT_KEYS["base-co"])

    def tokens(seed: int) -> list[str]:
        return api.completions.create(model=_base(http_server), prompt="Once upon a time", max_tokens=12,
                                      temperature=1.5, seed=seed, logprobs=0,
                                      extra_body={"ignore_eos": True}).choices[0].logprobs.tokens

    assert tokens(-1) == tokens(-1) == tokens((1 << 64) - 1)
    assert tokens(-(1 << 63)) == tokens(1 << 63) != tokens(-1)
