"""api.prompt_ids: text refused above api.max_prompt_chars without tokenizing; the bound is sound."""

from __future__ import annotations

import threading

import pytest

from nlora_serve.engine.api import PROMPT_CHARS_SLACK, max_prompt_chars, prompt_ids
from nlora_serve.engine.sampling import RequestError


class _Tokenizer:
    """A tokenizer whose vocabulary's longest entry has 3 characters and that records encodes."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "bc": 1, "def": 2}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded.append(text)
        return [0] * len(text)


def test_a_prompt_above_the_bound_is_refused_before_tokenizing():
    tok = _Tokenizer()
    bound = max_prompt_chars(tok, max_model_len=10)
    assert bound == PROMPT_CHARS_SLACK * 3 * 10
    assert len(prompt_ids("x" * bound, tok, threading.Lock(), bound)) == bound  # at the bound: tokenized
    with pytest.raises(RequestError, match=f"prompt is {bound + 1:,} characters"):
        prompt_ids("x" * (bound + 1), tok, threading.Lock(), bound)
    assert [len(t) for t in tok.encoded] == [bound]  # the refused one never reached the tokenizer
    assert prompt_ids([5, 6], tok, threading.Lock(), 1) == [5, 6]  # token ids: no character bound


def test_no_token_of_the_default_tokenizer_spells_more_characters_than_its_entry(base_model_dir):
    """The bound's premise, checked on every token of the default model's vocabulary: decoding one
    token gives at most as many characters as its vocabulary entry has."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    vocab = tok.get_vocab()
    spelled = tok.batch_decode([[i] for i in vocab.values()], skip_special_tokens=False)
    assert all(len(text) <= len(entry) for entry, text in zip(vocab, spelled))
    assert max_prompt_chars(tok, 2048) == PROMPT_CHARS_SLACK * max(map(len, vocab)) * 2048
