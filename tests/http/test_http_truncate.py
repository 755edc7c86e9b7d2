"""vLLM's ``truncate_prompt_tokens`` (0.32's TokenizeParams): the prompt's last k tokens run (side
"left", vLLM's default for generation; ``truncation_side: "right"`` keeps the first k), -1 keeps
max_model_len - 1, a k over max_model_len is refused in vLLM's words. The reference is transformers'
greedy decoding of the cut token ids."""

from __future__ import annotations

import httpx2
import pytest

from grpc_harness import TENANT_KEYS
from http_harness import base_url, client, hf_greedy
from nlora_serve.engine.api import max_prompt_bytes

KEY = TENANT_KEYS["base-co"]
PROMPT = ("The keeper of the lighthouse wrote in his log every evening: the wind, the ships that "
          "passed, the colour of the sea and the birds on the rocks. On the last day of the year he wrote")
CHAT = [{"role": "user", "content": "Name three rivers in Europe and say which is longest."}]


def _tokens(logprobs, chat: bool) -> list[int]:
    tokens = [e.token for e in logprobs.content] if chat else logprobs.tokens
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.mark.parametrize("chat, prompt_kind, side", [
    (False, "text", None), (False, "text", "right"), (False, "ids", "left"), (True, "chat", None),
])
def test_the_kept_tokens_are_the_ones_run(http_server, tokenizer, hf_model, chat, prompt_kind, side):
    api = client(http_server, KEY)
    base = http_server.server.generation.info.model
    extra = {"truncate_prompt_tokens": 12, "return_tokens_as_token_ids": True, "min_tokens": 4}
    if side is not None:
        extra["truncation_side"] = side
    if chat:
        full = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
        answer = api.chat.completions.create(model=base, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                             extra_body=extra)
    else:
        full = tokenizer.encode(PROMPT)
        prompt = PROMPT if prompt_kind == "text" else full
        answer = api.completions.create(model=base, prompt=prompt, max_tokens=4, temperature=0, logprobs=0,
                                        extra_body=extra)
    kept = full[:12] if side == "right" else full[-12:]
    assert len(full) > 12 and answer.usage.prompt_tokens == 12
    assert _tokens(answer.choices[0].logprobs, chat) == hf_greedy(hf_model, kept, 4)


def test_a_prompt_shorter_than_k_runs_whole(http_server, tokenizer):
    answer = client(http_server, KEY).completions.create(
        model=http_server.server.generation.info.model, prompt=PROMPT, max_tokens=1,
        extra_body={"truncate_prompt_tokens": 1000})
    assert answer.usage.prompt_tokens == len(tokenizer.encode(PROMPT))


def test_minus_one_keeps_max_model_len_minus_one_and_leaves_one_token_to_generate(http_server, tokenizer, hf_model):
    """-1 on a prompt longer than the context (1024 tokens here): the last 1023 run, and max_tokens
    unset is the one token of context left."""
    ids = (tokenizer.encode(PROMPT) * 40)[:1100]
    answer = client(http_server, KEY).completions.create(
        model=http_server.server.generation.info.model, prompt=ids, temperature=0, logprobs=0,
        extra_body={"truncate_prompt_tokens": -1, "return_tokens_as_token_ids": True})
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (1023, 1)
    assert _tokens(answer.choices[0].logprobs, False) == hf_greedy(hf_model, ids[-1023:], 1)


@pytest.mark.parametrize("fields, param, words", [
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens", "got -2"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "empty prompt"),
    ({"truncate_prompt_tokens": 1025}, "truncate_prompt_tokens", "cannot be greater than max_model_len = 1024"),
    ({"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens", "integer"),
    ({"truncate_prompt_tokens": 5, "truncation_side": "middle"}, "truncation_side", "'left' or 'right'"),
    # the cut prompt must still leave room for one generated token (vLLM's rule; a max_tokens over
    # the room left is lowered to it, README)
    ({"truncate_prompt_tokens": 1024, "max_tokens": 100, "prompt": list(range(5, 1105))}, None,
     "maximum context length is 1024 tokens. However, you requested 1024 tokens in the messages"),
])
def test_bad_truncation_is_refused_naming_the_field(http_server, fields, param, words):
    body = {"model": http_server.server.generation.info.model, "prompt": PROMPT, "max_tokens": 2, **fields}
    reply = httpx2.post(base_url(http_server) + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400 and words in reply.json()["error"]["message"], reply.text
    if param is not None:
        assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("batch", [False, True])
def test_a_text_too_long_to_tokenize_is_refused_naming_prompt_and_saying_why_it_is_not_cut(http_server, tokenizer,
                                                                                         batch):
    """The engine refuses a text over max_prompt_bytes untokenized (the one tokenizer thread's guard),
    so truncate_prompt_tokens could never cut it: refused naming ``prompt`` and the way out, before
    any prompt of the request is tokenized (vLLM tokenizes any text whole, then cuts it)."""
    limit = max_prompt_bytes(tokenizer, http_server.engine.max_model_len)
    long = "é" * (limit // 2 + 1)  # two bytes a character: one byte over
    prompt = ["Hello", long] if batch else long
    body = {"model": http_server.server.generation.info.model, "prompt": prompt, "max_tokens": 2,
            "truncate_prompt_tokens": 12}
    reply = httpx2.post(base_url(http_server) + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "prompt", reply.text
    where = "prompt[1]" if batch else "prompt"
    assert error["message"].startswith(f"{where} is {len(long.encode()):,} bytes of UTF-8, over the {limit:,}"), error
    assert "token ids" in error["message"]
    cut = "é" * (limit // 2)  # at the limit it is tokenized, then cut
    body["prompt"] = ["Hello", cut] if batch else cut
    reply = httpx2.post(base_url(http_server) + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == (12 + 1 if batch else 12), reply.text
