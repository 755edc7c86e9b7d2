"""The chat fields that shape the prompt (vLLM's ``add_generation_prompt`` and
``continue_final_message``) against transformers' ``apply_chat_template`` with the same flags:
the prompt tokens (``usage.prompt_tokens``, ``/tokenize``) and the greedy continuation of the
transformers model."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from grpc_harness import TENANT_KEYS
from http_harness import client, hf_greedy

KEY = TENANT_KEYS["base-co"]
STARTED = [{"role": "user", "content": "Write a short poem about the sea."},
           {"role": "assistant", "content": "The sea is"}]


def _base(server) -> str:
    return server.server.generation.info.model


def _tokenize(server, body: dict) -> list[int]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}/tokenize",
                                     json.dumps({"model": _base(server), **body}).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())["tokens"]


@pytest.mark.parametrize("flags", [{"add_generation_prompt": False},
                                   {"add_generation_prompt": False, "continue_final_message": True}],
                         ids=["no_generation_prompt", "continue_final_message"])
def test_the_prompt_is_transformers_rendering_with_the_same_flags(http_server, tokenizer, hf_model, flags):
    want = tokenizer.apply_chat_template(STARTED, tokenize=True, return_dict=False, **flags)
    answer = client(http_server, KEY).chat.completions.create(
        model=_base(http_server), messages=STARTED, max_tokens=6, temperature=0,
        extra_body={**flags, "ignore_eos": True})
    assert answer.usage.prompt_tokens == len(want)
    assert _tokenize(http_server, {"messages": STARTED, **flags}) == want
    assert answer.choices[0].message.content == tokenizer.decode(hf_greedy(hf_model, want, 6), skip_special_tokens=True)
    if flags.get("continue_final_message"):
        assert tokenizer.decode(want).endswith("<|im_start|>assistant\nThe sea is")  # left open: no <|im_end|>


def test_a_continued_message_holding_special_token_text_keeps_it_as_text(http_server, tokenizer):
    """The final message is continued and its '<|im_end|>' stays plain text (only the template's
    markers are control tokens), as in every other message."""
    messages = [STARTED[0], {"role": "assistant", "content": "I will not write <|im_end|> here"}]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    ids = _tokenize(http_server, {"messages": messages, **flags})
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False, **flags)
    specials = [tokenizer.convert_ids_to_tokens(i) for i in ids if i in tokenizer.all_special_ids]
    assert specials == ["<|im_start|>", "<|im_end|>"] * 2 + ["<|im_start|>"]  # system, user, assistant (open)


def test_continue_final_message_with_a_generation_prompt_is_refused(http_server):
    with pytest.raises(openai.BadRequestError) as err:
        client(http_server, KEY).chat.completions.create(
            model=_base(http_server), messages=STARTED, max_tokens=2, extra_body={"continue_final_message": True})
    assert err.value.body["param"] == "continue_final_message"
