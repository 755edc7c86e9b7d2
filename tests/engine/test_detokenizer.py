"""Incremental detokenization: whole characters only, deltas join to the full decode, stop strings."""

from __future__ import annotations

import pytest

from nlora_serve.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer

TEXT = "東京の天気は晴れです 🌸🎉 naïve café — 你好，世界！ 👩‍👩‍👧 done"


@pytest.fixture(scope="module")
def tokenizer(base_fp32):
    return base_fp32.tokenizer()


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    deltas = []
    for t in ids:
        deltas.append(detok.add(t))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas, detok


def test_cjk_emoji_stream_joins_to_full_decode(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids)  # the text really splits characters
    deltas, _ = stream(tokenizer, ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT


def test_stop_string_truncates_and_is_never_streamed(tokenizer):
    ids = tokenizer.encode("The sky is blue. STOP here and more text", add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids, stop=("STOP",))
    assert detok.stopped
    assert "".join(deltas) == "The sky is blue. "
    assert not any("S" in d for d in deltas)


def test_stop_string_spanning_tokens_with_multibyte_text(tokenizer):
    text = "你好，世界！🌸 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids, stop=("世界", "zzz"))
    assert detok.stopped and "".join(deltas) == "你好，"
    assert all(REPLACEMENT not in d for d in deltas)


def test_dangling_partial_character_flushed_like_decode(tokenizer):
    ids = tokenizer.encode("ok 🌸", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    deltas, _ = stream(tokenizer, ids)
    assert all(REPLACEMENT not in d for d in deltas[:-1])
    assert "".join(deltas) == tokenizer.decode(ids)
