"""Records answers of a running vLLM 0.32 OpenAI server on the tests' default model
(SmolLM2-135M-Instruct, float32, greedy) that engine-free recordings (tests/http/vllm_shapes.py)
cannot give, as they come from vLLM's engine or renderer: logprob token strings where byte-level
tokens split a character (tests/http/test_http_vllm_shapes.py's
``test_split_characters_logprobs_as_vllms``), texts that end inside a character, chat prompts with
the developer role. Start vLLM, then record:

    .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name default \\
        --dtype float32 --enforce-eager --port 8000 &
    .venv/bin/python tests/http/vllm_live.py http://127.0.0.1:8000

DIR: the converted model folder in the prepared-model cache (``~/.cache/nlora-serve/models/...``).
vLLM decodes a token whose own decoding ends in U+FFFD again after up to 4 preceding tokens of the
sequence (``LogprobsProcessor._correct_decoded_token``): "" while the character is incomplete, the
whole character on the token that completes it. Each case here is one of tests/http/vllm_shapes.py's
(``kind``, ``request``, ``prompt_ids``, ``prompt_text``, ``prompt_logprobs``, ``steps``), its engine
outputs read from vLLM's answer with ``return_tokens_as_token_ids`` (every token as its id), beside
``vllm``: vLLM's answer to ``request`` itself; and ``cut_texts``: completions whose last tokens leave
a character incomplete (tests/engine/test_detokenizer.py's reference: vLLM writes no U+FFFD for
it); and ``developer_chats``: the prompt ids vLLM's /tokenize gives chats with the developer role
(tests/http/test_http_chat_fields.py's reference), written to tests/data/vllm_live.json.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

OUT = Path(__file__).parents[1] / "data" / "vllm_live.json"
PROMPT = "日本語で"  # 3 byte-level tokens per character, some characters merged
MESSAGES = [{"role": "user", "content": "日本語で話して"}]


def _post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, json.dumps({"model": "default", "temperature": 0, **body}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


def _id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def _completion_case(url: str, request: dict) -> dict:
    """``request`` (a /v1/completions body on PROMPT) as a case: vLLM's engine outputs (ids, the top 3
    per position and the prompt scored to 3) and its answer."""
    generated = {key: value for key, value in request.items() if key != "echo"}  # echo: the prompt's tokens too
    ids = _post(url, "/v1/completions", {**generated, "prompt": PROMPT, "logprobs": 3, "prompt_logprobs": 3,
                                         "return_tokens_as_token_ids": True, "return_token_ids": True})
    choice = ids["choices"][0]
    logprobs = choice["logprobs"]
    k = request.get("prompt_logprobs", request.get("logprobs", 0))  # what the prompt is scored to
    n = request.get("logprobs") or 0
    prompt_logprobs = [None if e is None else {t: [v["logprob"], v["rank"]] for i, (t, v) in enumerate(e.items())
                                               if i == 0 or v["rank"] <= k}
                       for e in choice["prompt_logprobs"]]
    sampled = []
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):
        best = sorted(top.items(), key=lambda kv: -kv[1])[:n]
        sampled.append({str(_id(token)): [top[token], 0], **{str(_id(t)): [lp, 0] for t, lp in best}})
    steps = [[{"index": 0, "text": ids["choices"][0]["text"], "token_ids": choice["token_ids"],
               "finish_reason": choice["finish_reason"], "logprobs": sampled}]]
    return {"case": {"kind": "completion", "request": request, "prompt_ids": choice["prompt_token_ids"],
                     "prompt_text": PROMPT, "prompt_logprobs": prompt_logprobs, "steps": steps},
            "vllm": _post(url, "/v1/completions", {**request, "prompt": PROMPT})}


def _chat_case(url: str, request: dict) -> dict:
    ids = _post(url, "/v1/chat/completions", {**request, "messages": MESSAGES, "return_tokens_as_token_ids": True,
                                              "return_token_ids": True})
    choice = ids["choices"][0]
    sampled = [{str(_id(e["token"])): [e["logprob"], 0], **{str(_id(t["token"])): [t["logprob"], 0]
                                                            for t in e["top_logprobs"]}}
               for e in choice["logprobs"]["content"]]
    steps = [[{"index": 0, "text": choice["message"]["content"], "token_ids": choice["token_ids"],
               "finish_reason": choice["finish_reason"], "logprobs": sampled}]]
    return {"case": {"kind": "chat", "request": request, "prompt_ids": ids["prompt_token_ids"], "steps": steps},
            "vllm": _post(url, "/v1/chat/completions", {**request, "messages": MESSAGES})}


def _cut_text(url: str, request: dict) -> dict:
    """A completion that ends inside a character: its tokens and vLLM's text (no trailing U+FFFD)."""
    answer = _post(url, "/v1/completions", {**request, "prompt": PROMPT, "return_token_ids": True})
    choice = answer["choices"][0]
    return {"request": request, "token_ids": choice["token_ids"], "text": choice["text"],
            "finish_reason": choice["finish_reason"], "stop_reason": choice["stop_reason"]}


# chat messages with OpenAI's developer role: vLLM 0.32 renders them as system messages, merged into
# one first, under a template that names no developer role (SmolLM2's; renderers/hf.py)
DEVELOPER_CHATS = {
    "developer, user": [{"role": "developer", "content": "Answer in one word."},
                        {"role": "user", "content": "What is the capital of France?"}],
    "system, developer, user": [{"role": "system", "content": "Be kind."}, {"role": "developer", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}],
    "user, developer, user": [{"role": "user", "content": "Hi"}, {"role": "developer", "content": "Be brief."},
                              {"role": "user", "content": "Colors?"}],
    "developer parts, user": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."},
                                                                {"type": "text", "text": "Be kind."}]},
                              {"role": "user", "content": "Hi"}],
}


def main() -> None:
    url = sys.argv[1].rstrip("/")
    cases = {"completion logprobs 3": _completion_case(url, {"max_tokens": 4, "logprobs": 3}),
             "completion echo logprobs 1": _completion_case(url, {"max_tokens": 2, "logprobs": 1, "echo": True}),
             "completion prompt_logprobs 1": _completion_case(url, {"max_tokens": 1, "prompt_logprobs": 1}),
             "chat top_logprobs 2": _chat_case(url, {"max_tokens": 4, "logprobs": True, "top_logprobs": 2})}
    # the byte 0xC3 alone (byte-level entry "Ã", id 131): never completed, with and without a stop string
    cut = {"max_tokens 6": _cut_text(url, {"max_tokens": 6}),
           "byte 0xC3": _cut_text(url, {"max_tokens": 1, "allowed_token_ids": [131]}),
           "byte 0xC3 stop U+FFFD": _cut_text(url, {"max_tokens": 1, "allowed_token_ids": [131], "stop": ["\ufffd"]})}
    chats = {name: {"messages": messages, "prompt_ids": _post(url, "/tokenize", {"messages": messages})["tokens"]}
             for name, messages in DEVELOPER_CHATS.items()}
    version = urllib.request.urlopen(url + "/version", timeout=30).read()
    OUT.write_text(json.dumps({"vllm": json.loads(version)["version"], "model": "SmolLM2-135M-Instruct",
                               "prompt": PROMPT, "messages": MESSAGES, "cases": cases,
                               "cut_texts": cut, "developer_chats": chats}, indent=1,
                              ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
