"""``echo`` and ``prompt_logprobs`` over HTTP, in vLLM's shapes, against transformers' float64
log_softmax over the prompt (the base model, and the tied and LoRA tenants on weights merged
straight from their files); the exact request lm-evaluation-harness's ``local-completions`` model
sends for a loglikelihood task; the refusals."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "adapters"))  # the merge straight from the files

from adapter_helpers import file_deltas, merged  # noqa: E402
from grpc_harness import TENANT_KEYS  # noqa: E402
from http_harness import CASES  # noqa: E402

TOL = 1e-3  # fp32 server against the fp32 model's logits in float64 (as test_engine's logprobs test)
CONTEXT, CONTINUATION = "Question: what is the capital of France?\nAnswer:", " The capital of France is Paris."


def post(server, key: str, path: str, body: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}/v1/{path}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            raw = answer.read().decode()
            return answer.status, raw if body.get("stream") else json.loads(raw)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rows(model, ids: list[int], adapter: str | None = None) -> torch.Tensor:
    """[len(ids) - 1, V] float64: row p is log p(. | ids[:p + 1]) under ``model`` (merged with
    ``adapter``'s files when given)."""
    deltas, biases = file_deltas(CASES / adapter) if adapter else ({}, {})
    with merged(model, deltas, biases), torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)


def base_name(server) -> str:
    return server.server.generation.info.model


@pytest.mark.parametrize("tenant,adapter", [("base-co", None), ("tied-co", "inttune-nystrom-tied"),
                                            ("lora-co", "lora-rslora")])
def test_lm_eval_loglikelihood_request_scores_the_continuation(http_server, tokenizer, hf_model, tenant, adapter):
    context = tokenizer.encode(CONTEXT, add_special_tokens=False)
    ids = context + tokenizer.encode(CONTINUATION, add_special_tokens=False)
    # LocalCompletionsAPI._create_payload(generate=False), tokenized_requests (its default), batch size 1
    payload = {"model": adapter or base_name(http_server), "prompt": [ids], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    status, body = post(http_server, TENANT_KEYS[tenant], "completions", payload)
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    want = rows(hf_model, ids, adapter)
    # LocalCompletionsAPI.parse_logprobs: the continuation's positions, the generated token left out
    ctxlen = len(context)
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    got = sum(lp["token_logprobs"][ctxlen:-1])
    expected = sum(float(want[p - 1, ids[p]]) for p in range(ctxlen, len(ids)))
    assert got == pytest.approx(expected, abs=TOL * (len(ids) - ctxlen))
    for p in range(1, len(ids)):
        assert lp["token_logprobs"][p] == pytest.approx(float(want[p - 1, ids[p]]), abs=TOL), p
        # the prompt token first, then the most likely one when it is another (logprobs 1: up to 2)
        best = int(want[p - 1].argmax())
        entries = [(tokenizer.decode([t]), float(want[p - 1, t])) for t in dict.fromkeys([ids[p], best])]
        assert list(lp["top_logprobs"][p]) == [token for token, _ in entries], p
        assert list(lp["top_logprobs"][p].values()) == pytest.approx([value for _, value in entries], abs=TOL)
    is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                             lp["top_logprobs"][ctxlen:-1]))
    assert is_greedy == all(int(want[p - 1].argmax()) == ids[p] for p in range(ctxlen, len(ids)))
    # the text: the prompt decoded, then the generated token's; offsets run on over both
    generated = lp["tokens"][-1] if choice["finish_reason"] == "length" else ""  # EOS leaves no text
    assert choice["text"] == tokenizer.decode(ids) + generated
    assert lp["tokens"][:len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 1


def test_echo_max_tokens_zero_and_streamed_as_vllm(http_server, tokenizer, hf_model):
    key, model = TENANT_KEYS["base-co"], base_name(http_server)
    ids = tokenizer.encode(CONTEXT)  # a text prompt takes the tokenizer's special tokens (a BOS here)
    # echo without logprobs: the text only, nothing scored
    status, plain = post(http_server, key, "completions", {"model": model, "prompt": CONTEXT, "echo": True,
                                                           "max_tokens": 3, "temperature": 0})
    assert status == 200 and plain["choices"][0]["text"].startswith(CONTEXT)
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["prompt_logprobs"] is None
    status, off = post(http_server, key, "completions", {"model": model, "prompt": CONTEXT, "echo": None,
                                                         "max_tokens": 3, "temperature": 0})
    assert status == 200 and off["choices"][0]["text"] == plain["choices"][0]["text"][len(CONTEXT):]  # null: off
    # max_tokens=0 with echo: the prompt alone (vLLM's echo without generation)
    status, only = post(http_server, key, "completions", {"model": model, "prompt": CONTEXT, "echo": True,
                                                          "max_tokens": 0, "logprobs": 2, "temperature": 0})
    assert status == 200, only
    choice = only["choices"][0]
    assert choice["text"] == CONTEXT and only["usage"]["completion_tokens"] == 1  # computed, not returned (vLLM)
    assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["logprobs"]["token_logprobs"][0] is None
    want = rows(hf_model, ids)
    for p in range(1, len(ids)):
        assert choice["logprobs"]["token_logprobs"][p] == pytest.approx(float(want[p - 1, ids[p]]), abs=TOL)
        top2 = want[p - 1].topk(2).indices.tolist()  # the prompt token and the 2 most likely: 2 or 3
        assert len(choice["logprobs"]["top_logprobs"][p]) == len({ids[p], *top2})
    # vLLM's: the prompt scored to logprobs comes back as prompt_logprobs too (the token and its top 2)
    assert [None if e is None else len(e) for e in choice["prompt_logprobs"]] == \
        [None] + [len({ids[p], *want[p - 1].topk(2).indices.tolist()}) for p in range(1, len(ids))]
    # streamed: the first chunk holds the prompt and the first token, prompt logprobs first
    whole_body = {"model": model, "prompt": CONTEXT, "echo": True, "max_tokens": 4, "logprobs": 1, "temperature": 0}
    status, whole = post(http_server, key, "completions", whole_body)
    status_s, raw = post(http_server, key, "completions", {**whole_body, "stream": True})
    assert status == status_s == 200
    chunks = [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"].startswith(CONTEXT)
    assert len(chunks[0]["choices"][0]["logprobs"]["tokens"]) == len(ids) + 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    for field in ("tokens", "token_logprobs", "text_offset"):
        streamed = [v for c in chunks for v in c["choices"][0]["logprobs"][field]]
        assert streamed == pytest.approx(whole["choices"][0]["logprobs"][field]) if field == "token_logprobs" \
            else streamed == whole["choices"][0]["logprobs"][field]


@pytest.mark.parametrize("logprobs,prompt_logprobs", [(1, 3), (3, 1)])
def test_echo_with_prompt_logprobs_of_another_size_as_vllm(http_server, tokenizer, hf_model, logprobs,
                                                           prompt_logprobs):
    """vLLM 0.32 scores the prompt to prompt_logprobs K when sent (CompletionRequest.to_sampling_params)
    and gives each echoed token the first logprobs + 1 items of that position's {token id: Logprob},
    the token first, then its top K (_create_completion_logprobs): with K > N always N + 1 entries,
    the token among the N most likely or not; with K < N at most K + 1."""
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
    status, answer = post(http_server, TENANT_KEYS["base-co"], "completions",
                          {"model": base_name(http_server), "prompt": ids, "echo": True, "max_tokens": 1,
                           "temperature": 0, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs})
    assert status == 200, answer
    choice, want = answer["choices"][0], rows(hf_model, ids)
    tops = choice["logprobs"]["top_logprobs"][:len(ids)]
    assert tops[0] is None and choice["prompt_logprobs"][0] is None
    for p in range(1, len(ids)):
        entry = list(dict.fromkeys([ids[p], *want[p - 1].topk(prompt_logprobs).indices.tolist()]))
        assert list(tops[p]) == [tokenizer.decode([t]) for t in entry[:logprobs + 1]], p
        assert list(choice["prompt_logprobs"][p]) == [str(t) for t in entry], p


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_prompt_logprobs_in_vllm_shape(http_server, tokenizer, hf_model, chat):
    key, model = TENANT_KEYS["tied-co"], "inttune-nystrom-tied"
    messages = [{"role": "user", "content": "Name three colours."}]
    if chat:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        body = {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    else:
        ids = tokenizer.encode("Name three colours:", add_special_tokens=False)
        body = {"model": model, "prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    status, answer = post(http_server, key, "chat/completions" if chat else "completions", body)
    assert status == 200, answer
    shaped = answer["prompt_logprobs"] if chat else answer["choices"][0]["prompt_logprobs"]
    want = rows(hf_model, ids, model)
    assert len(shaped) == len(ids) and shaped[0] is None
    for p in range(1, len(ids)):
        entry, row = shaped[p], want[p - 1]
        mine = entry[str(ids[p])]
        assert mine["logprob"] == pytest.approx(float(row[ids[p]]), abs=TOL)
        assert mine["decoded_token"] == tokenizer.decode([ids[p]])
        assert 1 + int((row > row[ids[p]] + TOL).sum()) <= mine["rank"] <= 1 + int((row > row[ids[p]] - TOL).sum())
        top = row.topk(2)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            assert entry[str(t)]["logprob"] == pytest.approx(v, abs=TOL)
            assert entry[str(t)]["rank"] == rank
        assert len(entry) <= 3


@pytest.mark.parametrize("path,extra,param,words", [
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs", "[0, 20]"),
    ("completions", {"prompt_logprobs": -1}, "prompt_logprobs", "[0, 20]"),
    ("completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
    ("chat/completions", {"prompt_logprobs": 2, "stream": True}, "prompt_logprobs", "stream"),
    ("chat/completions", {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs", "vLLM accepts 0"),
    ("chat/completions", {"prompt_logprobs": 99}, "prompt_logprobs", "[0, 20]"),
    ("chat/completions", {"echo": True}, "echo", "prompt_logprobs"),
    ("completions", {"max_tokens": 0}, "max_tokens", ">= 1"),
])
def test_bad_echo_and_prompt_logprobs_are_refused_naming_the_field(http_server, path, extra, param, words):
    body = {"model": base_name(http_server), "max_tokens": 2, **extra}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if path.startswith("chat") else {"prompt": "Hi"})
    status, answer = post(http_server, TENANT_KEYS["base-co"], path, body)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert words in answer["error"]["message"], answer
