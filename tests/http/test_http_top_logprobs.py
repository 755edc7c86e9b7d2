"""The legacy completions API's ``logprobs: N``: per token the N most likely tokens and the token
itself (sampled, or the echoed prompt's), so up to N + 1 entries in ``top_logprobs`` (OpenAI's rule,
vLLM 0.32's completion/serving.py ``_create_completion_logprobs``), the token's first; ``logprobs: 0``
gives the token alone. Checked against transformers' float64 log_softmax of the raw logits, with
``logit_bias`` pushing a token far outside the top N, whole and streamed, and on echoed prompts.
vLLM's ``logprob_token_ids`` replace the top N with the given ids (completions and chat)."""

from __future__ import annotations

import openai
import pytest
import torch

from grpc_harness import TENANT_KEYS
from http_harness import client

TOL = 1e-3  # fp32 server against the fp32 model's logits in float64
PROMPT = "Question: what is the capital of France?\nAnswer: The capital of France is Paris."


def _base(server) -> str:
    return server.server.generation.info.model


def _log_softmax(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float64: row p is log p(. | ids[:p + 1]) of the raw logits."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _check_position(top: dict[str, float], token: int, row: torch.Tensor, n: int) -> bool:
    """``top`` (keys ``token_id:<id>``) is ``token`` first, then the ``n`` most likely others of
    ``row``, best first, each with its reference log-probability; True when ``token`` is not among
    the ``n`` most likely (so the entry has ``n`` + 1 tokens)."""
    ids = [int(key.removeprefix("token_id:")) for key in top]
    best = row.topk(n).indices.tolist() if n else []
    assert ids[0] == token
    assert ids[1:] == [t for t in best if t != token]
    for t, value in zip(ids, top.values()):
        assert value == pytest.approx(float(row[t]), abs=TOL)
    outside = token not in best
    assert len(top) == n + outside
    return outside


@pytest.mark.parametrize("n", [0, 2])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_sampled_token_outside_the_top_n_comes_as_an_extra_entry(http_server, tokenizer, hf_model, n, stream):
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    first = _log_softmax(hf_model, prompt)[-1]
    pushed = int(first.argsort(descending=True)[12])  # rank 13: outside any top N asked here
    answer = client(http_server, TENANT_KEYS["base-co"]).completions.create(
        model=_base(http_server), prompt=prompt, max_tokens=5, temperature=0, logprobs=n, stream=stream,
        logit_bias={str(pushed): 100}, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    parts = [c.choices[0].logprobs for c in answer if c.choices and c.choices[0].logprobs] if stream \
        else [answer.choices[0].logprobs]
    tokens = [int(t.removeprefix("token_id:")) for p in parts for t in p.tokens]
    tops = [top for p in parts for top in p.top_logprobs]
    assert tokens == [pushed] * 5  # the bias decides greedy; the logprobs stay the raw distribution's
    rows = _log_softmax(hf_model, prompt + tokens)[len(prompt) - 1:-1]
    outside = [_check_position(top, t, row, n) for top, t, row in zip(tops, tokens, rows, strict=True)]
    assert outside[0] and len(tops[0]) == n + 1


@pytest.mark.parametrize("n", [0, 1, 3])
def test_echoed_prompt_tokens_come_with_their_top_n(http_server, tokenizer, hf_model, n):
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    answer = client(http_server, TENANT_KEYS["base-co"]).completions.create(
        model=_base(http_server), prompt=prompt, max_tokens=1, temperature=0, logprobs=n, echo=True,
        extra_body={"return_tokens_as_token_ids": True})
    lp = answer.choices[0].logprobs
    rows = _log_softmax(hf_model, prompt)
    assert lp.top_logprobs[0] is None and lp.token_logprobs[0] is None
    outside = [_check_position(lp.top_logprobs[p], prompt[p], rows[p - 1], n) for p in range(1, len(prompt))]
    assert sum(outside) >= 3  # the case is exercised: prompt tokens the model would not have picked
    generated = int(lp.tokens[-1].removeprefix("token_id:"))
    assert generated == int(rows[-1].argmax())
    assert _check_position(lp.top_logprobs[-1], generated, rows[-1], n) == (n == 0)
    # lm-evaluation-harness's is_greedy: each token's logprob is the max of its top_logprobs; it
    # tells greedy tokens apart with N >= 1 (it sends 1), and with 0 the token is alone
    is_greedy = [lp.token_logprobs[p] == max(lp.top_logprobs[p].values()) for p in range(1, len(prompt))]
    assert is_greedy == [n == 0 or int(rows[p - 1].argmax()) == prompt[p] for p in range(1, len(prompt))]


def _ids_entry(top: dict[str, float] | list, token: int, ids: list[int], row: torch.Tensor) -> None:
    """vLLM 0.32's entry with ``logprob_token_ids``: its logprobs dict ``{sampled: lp, id: lp, ...}``
    (the sampler's column 0 is the sampled token, then the ids in their order; a dict keeps a repeated
    key at its first place), every entry returned; values of the raw distribution (``row``)."""
    if isinstance(top, list):  # chat: [{"token", "logprob", "bytes"}]
        top = {e.token: e.logprob for e in top}
    keys = [int(key.removeprefix("token_id:")) for key in top]
    assert keys == list(dict.fromkeys([token, *ids]))
    for t, value in zip(keys, top.values()):
        assert value == pytest.approx(float(row[t]), abs=TOL)


def test_logprob_token_ids_replace_the_top_n(http_server, tokenizer, hf_model):
    """vLLM's ``logprob_token_ids``: per generated token the sampled token's log-probability and
    those of the given ids (a repeated id once, the sampled one not twice), in place of the top
    ``logprobs`` / ``top_logprobs`` (whatever their count), on completions and in a chat stream."""
    api = client(http_server, TENANT_KEYS["base-co"])
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    first = _log_softmax(hf_model, prompt)[-1]
    greedy, unlikely = int(first.argmax()), int(first.argmin())
    ids = [unlikely, 17, greedy, 17, int(first.argsort(descending=True)[3])]
    answer = api.completions.create(model=_base(http_server), prompt=prompt, max_tokens=3, temperature=0, logprobs=1,
                                    extra_body={"logprob_token_ids": ids, "return_tokens_as_token_ids": True,
                                                "ignore_eos": True})
    lp = answer.choices[0].logprobs
    tokens = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    rows = _log_softmax(hf_model, prompt + tokens)[len(prompt) - 1:-1]
    assert tokens[0] == greedy
    for top, token, value, row in zip(lp.top_logprobs, tokens, lp.token_logprobs, rows, strict=True):
        _ids_entry(top, token, ids, row)
        assert value == pytest.approx(float(row[token]), abs=TOL)

    chunks = list(api.chat.completions.create(
        model=_base(http_server), messages=[{"role": "user", "content": "Name a colour."}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"logprob_token_ids": ids, "return_tokens_as_token_ids": True, "return_token_ids": True}))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    chat_prompt = chunks[0].model_extra["prompt_token_ids"]
    tokens = [int(e.token.removeprefix("token_id:")) for e in entries]
    rows = _log_softmax(hf_model, chat_prompt + tokens)[len(chat_prompt) - 1:-1]
    assert len(tokens) == 3
    for entry, token, row in zip(entries, tokens, rows, strict=True):
        _ids_entry(entry.top_logprobs, token, ids, row)
        assert entry.logprob == pytest.approx(float(row[token]), abs=TOL)


@pytest.mark.parametrize("chat, fields, message", [
    (True, {"logprob_token_ids": [5]}, "when using `logprob_token_ids`, `logprobs` must be set to true."),
    (False, {"logprob_token_ids": [5]}, "when using `logprob_token_ids`, `logprobs` must be set."),
    (False, {"logprob_token_ids": [5], "logprobs": 0, "echo": True, "max_tokens": 0},
     "`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` because no output tokens are "
     "generated."),
    (False, {"logprob_token_ids": [5, 49152, 10**6], "logprobs": 0},
     "token_id(s) [49152, 1000000] in logprob_token_ids contain out-of-vocab token ids. Vocabulary size: 49152"),
])
def test_logprob_token_ids_refusals_in_vllm_words(http_server, chat, fields, message):
    api = client(http_server, TENANT_KEYS["base-co"])
    common = dict(model=_base(http_server), extra_body=fields)
    with pytest.raises(openai.BadRequestError) as err:
        if chat:
            api.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], logprobs=False, **common)
        else:
            api.completions.create(prompt="Hi", **common)
    assert err.value.body["message"] == message and err.value.body["param"] == "logprob_token_ids"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("as_ids", [False, True], ids=["tokens", "token_ids"])
def test_chat_logprobs_bytes_join_to_the_texts_utf8(http_server, tokenizer, stream, as_ids):
    """Greedy, the model repeats three emoji (3 byte-level tokens each, the pieces' strings "" but the
    last's, the whole emoji, as in vLLM 0.32): the entries' bytes join to the content's UTF-8, and so
    do their strings; the content is the tokenizer's decode of the tokens (their ids from
    return_tokens_as_token_ids)."""
    answer = client(http_server, TENANT_KEYS["base-co"]).chat.completions.create(
        model=_base(http_server), messages=[{"role": "user", "content": "Repeat exactly: 😀😀😀 日本語"}],
        max_tokens=9, temperature=0, logprobs=True, top_logprobs=2, stream=stream,
        extra_body={"return_tokens_as_token_ids": as_ids})
    choices = [c.choices[0] for c in answer] if stream else [answer.choices[0]]
    content = "".join((c.delta.content or "") if stream else c.message.content for c in choices)
    entries = [e for c in choices if c.logprobs for e in c.logprobs.content]
    assert len(entries) == 9 and "😀" in content
    assert b"".join(bytes(e.bytes) for e in entries) == content.encode()
    assert all(e.top_logprobs[0].bytes == e.bytes for e in entries)  # greedy: the top alternative is the token
    if as_ids:
        assert content == tokenizer.decode([int(e.token.removeprefix("token_id:")) for e in entries])
    else:
        assert "" in {e.token for e in entries} and "".join(e.token for e in entries) == content
