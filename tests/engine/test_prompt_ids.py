"""api.prompt_ids: text refused above api.max_prompt_bytes without tokenizing; the bound is sound."""

from __future__ import annotations

import threading

import pytest

from nlora_serve.engine.api import PROMPT_BYTES_SLACK, bytes_per_token, max_prompt_bytes, prompt_ids
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
    bound = max_prompt_bytes(tok, max_model_len=10)
    assert bound == PROMPT_BYTES_SLACK * 3 * 10  # not byte-level: the longest entry's UTF-8 bytes
    assert len(prompt_ids("x" * bound, tok, threading.Lock(), bound)) == bound  # at the bound: tokenized
    with pytest.raises(RequestError, match=f"prompt is {bound + 1:,} bytes of UTF-8"):
        prompt_ids("x" * (bound + 1), tok, threading.Lock(), bound)
    # counted in bytes, not characters: a quarter of the bound in 4-byte emoji is one byte too many
    emoji = "\N{GRINNING FACE}" * (bound // 4) + "x"
    with pytest.raises(RequestError, match=f"prompt is {bound + 1:,} bytes of UTF-8"):
        prompt_ids(emoji, tok, threading.Lock(), bound)
    assert [len(t) for t in tok.encoded] == [bound]  # the refused ones never reached the tokenizer
    assert prompt_ids([5, 6], tok, threading.Lock(), 1) == [5, 6]  # token ids: no byte bound


def test_no_token_of_the_default_tokenizer_spells_more_bytes_than_the_bound(base_model_dir):
    """The bound's premise, checked on every token of the default model's vocabulary (byte-level
    BPE): a token's text is the bytes its entry's characters stand for under GPT-2's byte-to-unicode
    map, one byte a character, so no token spells more bytes than the longest entry has characters."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    vocab = tok.get_vocab()
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_tokens) | set(tok.added_tokens_encoder)
    for entry in vocab:
        if entry in special:
            continue
        spelled = bytes(byte_of[c] for c in entry)  # KeyError: a character that stands for no byte
        # the tokenizer agrees: the entry's id decodes to those bytes (partial UTF-8 as U+FFFD)
        assert tok.decode([vocab[entry]]) == spelled.decode("utf-8", "replace"), entry
    assert bytes_per_token(tok) == max(map(len, vocab))
    assert max_prompt_bytes(tok, 2048) == PROMPT_BYTES_SLACK * max(map(len, vocab)) * 2048
