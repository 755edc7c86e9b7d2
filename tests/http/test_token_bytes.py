"""Chat logprobs' ``bytes``: each token's raw bytes (serving/http_api/token_bytes.py), so the bytes of a
text's tokens join to its UTF-8 even where a token holds part of a character (its string is then
U+FFFD). References: transformers' GPT-2 byte map and the tokenizers' own ``decode``."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from nlora_serve.serving.http_api.token_bytes import BYTE_OF_CHAR, TokenBytes

TEXT = "東京の天気は晴れです 🌸🎉 naïve café — 你好，世界！ 👩‍👩‍👧 done"


def test_the_byte_map_is_gpt2s():
    assert BYTE_OF_CHAR == {c: b for b, c in bytes_to_unicode().items()}


def test_byte_level_tokens_join_to_the_texts_utf8(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.byte_level and any(tokenizer.decode([t]) == "\ufffd" for t in ids)  # split characters
    assert b"".join(token_bytes(t) for t in ids) == TEXT.encode()


def test_random_ids_and_special_tokens_spell_what_decode_spells(tokenizer):
    """Any ids, special tokens included: the joined bytes decode (invalid UTF-8 as U+FFFD) to the
    tokenizer's own decode of the ids."""
    ids = torch.randint(0, len(tokenizer), (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    ids += sorted(tokenizer.all_special_ids)
    token_bytes = TokenBytes(tokenizer)
    assert b"".join(token_bytes(t) for t in ids).decode("utf-8", "replace") == tokenizer.decode(ids)


def test_sentencepiece_byte_fallback_entries_are_their_byte():
    """A Llama-2-style tokenizer: pieces "▁" and "<0xNN>" byte-fallback entries (no merges, so the
    emoji and CJK characters fall back to one entry per byte)."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁": 257, "H": 258, "▁Hello": 259}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    text = "Hello 😀 日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.byte_fallback and "<0xF0>" in tokenizer.convert_ids_to_tokens(ids)
    # decode strips the one leading space the "▁" prefix spells (its Strip step); the bytes keep it
    assert tokenizer.decode(ids) == text
    assert b"".join(token_bytes(t) for t in ids) == b" " + text.encode()
