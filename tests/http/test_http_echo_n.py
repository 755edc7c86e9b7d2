"""``echo: true`` with ``n`` > 1 on /v1/completions, as vLLM 0.32 shapes it
(entrypoints/openai/completion/serving.py): every choice's text starts with the echoed prompt and,
with ``logprobs``, its logprobs with the prompt's tokens. With a ``seed``, choice j of prompt i is
the one-choice answer of prompt i with ``seed + j``; the echoed prompt's log-probabilities are
transformers' float64 log_softmax."""

from __future__ import annotations

import pytest

from grpc_harness import TENANT_KEYS
from test_http_batch import TEXTS, _streamed
from test_http_echo_prompt_logprobs import TOL, base_name, post, rows

KEY = TENANT_KEYS["base-co"]
SAMPLED = {"max_tokens": 5, "temperature": 1.0, "top_k": 50, "ignore_eos": True, "logprobs": 1, "echo": True}


def check_echoed(choice: dict, ids: list[int], want, tokenizer) -> None:
    """``choice`` starts with the prompt ``ids`` (text and logprobs), scored as ``want``'s rows."""
    lp = choice["logprobs"]
    assert choice["text"].startswith(tokenizer.decode(ids))
    assert lp["tokens"][:len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for p in range(1, len(ids)):
        assert lp["token_logprobs"][p] == pytest.approx(float(want[p - 1, ids[p]]), abs=TOL), p
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


def same_choice(got: dict, alone: dict) -> None:
    assert got["text"] == alone["text"]
    assert got["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
    assert got["logprobs"]["text_offset"] == alone["logprobs"]["text_offset"]
    assert got["logprobs"]["token_logprobs"][1:] == pytest.approx(alone["logprobs"]["token_logprobs"][1:], abs=TOL)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_text_prompt_n_choices_each_echo_the_prompt(http_server, tokenizer, hf_model, stream):
    text = TEXTS[0]
    ids = tokenizer.encode(text)  # a text prompt takes the tokenizer's special tokens
    fields = {**SAMPLED, "model": base_name(http_server), "prompt": text}
    status, answer = post(http_server, KEY, "completions", {**fields, "n": 3, "seed": 11, "stream": stream})
    assert status == 200, answer
    got = _streamed(answer) if stream else {c["index"]: c for c in answer["choices"]}
    assert sorted(got) == [0, 1, 2]
    want = rows(hf_model, ids)
    for i in range(3):
        status, alone = post(http_server, KEY, "completions", {**fields, "seed": 11 + i})
        assert status == 200, alone
        same_choice(got[i], alone["choices"][0])
        check_echoed(got[i], ids, want, tokenizer)
        assert len(got[i]["logprobs"]["tokens"]) == len(ids) + 5
    assert len({got[i]["text"] for i in range(3)}) > 1  # seeds 11, 12, 13
    if not stream:
        assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (len(ids), 15)


def test_batch_of_token_id_prompts_n_choices_each_echo_their_prompt(http_server, tokenizer, hf_model):
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS[1:]]
    fields = {**SAMPLED, "model": base_name(http_server)}
    status, answer = post(http_server, KEY, "completions", {**fields, "prompt": prompts, "n": 2, "seed": 7})
    assert status == 200, answer
    got = {c["index"]: c for c in answer["choices"]}
    assert sorted(got) == [0, 1, 2, 3]
    for i, ids in enumerate(prompts):
        want = rows(hf_model, ids)
        for j in range(2):
            _, alone = post(http_server, KEY, "completions", {**fields, "prompt": ids, "seed": 7 + j})
            same_choice(got[i * 2 + j], alone["choices"][0])
            check_echoed(got[i * 2 + j], ids, want, tokenizer)
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (sum(map(len, prompts)), 20)


def test_echo_without_generation_n_choices_are_the_prompt(http_server, tokenizer, hf_model):
    # max_tokens=0: each choice is the prompt alone (vLLM computes one token per choice and counts it)
    ids = tokenizer.encode(TEXTS[1])
    body = {**SAMPLED, "model": base_name(http_server), "prompt": TEXTS[1], "max_tokens": 0, "n": 2, "seed": 3}
    status, answer = post(http_server, KEY, "completions", body)
    assert status == 200, answer
    want = rows(hf_model, ids)
    for choice in answer["choices"]:
        assert choice["text"] == TEXTS[1] and len(choice["logprobs"]["tokens"]) == len(ids)
        check_echoed(choice, ids, want, tokenizer)
    assert sorted(c["index"] for c in answer["choices"]) == [0, 1]
    assert answer["usage"]["completion_tokens"] == 2
