"""Incremental detokenization: whole characters only, deltas join to the full decode, stop strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nlora_serve.engine.detokenizer import REPLACEMENT, DecodeStream, IncrementalDetokenizer, stream_backend

TEXT = "東京の天気は晴れです 🌸🎉 naïve café — 你好，世界！ 👩‍👩‍👧 done"


@pytest.fixture(scope="module")
def tokenizer(base_fp32):
    return base_fp32.tokenizer()


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = (),
           **options) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop=stop, **options)
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


@pytest.mark.parametrize("fast", [True, False], ids=["decode_stream", "window"])
def test_include_stop_keeps_the_stop_string_begun_in_text_already_sent(tokenizer, fast):
    """include_stop holds nothing back, so " sky is" is streamed before " blue." completes the stop
    string "is blue" that began in it: the text still ends right after the stop string (vLLM's
    include_stop_str_in_output), and nothing streamed is retracted."""
    ids = tokenizer.encode("The sky is blue. STOP here", add_special_tokens=False)
    deltas, detok = stream(tokenizer, ids, stop=("blue.", "is blue"), fast=fast, include_stop=True)
    assert detok.stopped and "".join(deltas) == "The sky is blue"
    assert "".join(deltas[:-2]).endswith("is")  # "is" went out before the stop string completed


@pytest.mark.parametrize("fast", [True, False], ids=["decode_stream", "window"])
def test_include_stop_finds_a_stop_string_in_the_first_characters(tokenizer, fast):
    """The first token is the stop string " on" (vLLM: the text is " on", finish "stop"); the search
    for it once started at -2, which str.find counts from the end, and generation ran on."""
    ids = tokenizer.encode(" on a cliff, and", add_special_tokens=False)
    assert tokenizer.decode(ids[:1]) == " on"
    deltas, detok = stream(tokenizer, ids, stop=(" on",), fast=fast, include_stop=True)
    assert detok.stopped and detok.stop_string == " on"
    assert "".join(deltas) == " on" and len(detok.ids) == 1


# vLLM 0.32's texts of completions whose last tokens leave a character incomplete, recorded by
# tests/http/vllm_live.py from a vLLM server on the default model
CUT_TEXTS = json.loads((Path(__file__).parents[1] / "data" / "vllm_live.json").read_text())["cut_texts"]


@pytest.mark.parametrize("fast", [True, False], ids=["stream", "window"])
@pytest.mark.parametrize("name", list(CUT_TEXTS))
def test_dangling_partial_character_not_written_as_vllm(tokenizer, name, fast):
    """The bytes of a character the last tokens leave incomplete are not written (decode's U+FFFD),
    as vLLM 0.32's text: "は、メ", not "は、メ\ufffd"; a stop string U+FFFD then finds nothing."""
    case = CUT_TEXTS[name]
    ids = case["token_ids"]
    assert tokenizer.decode(ids) == case["text"] + REPLACEMENT  # what the flush wrote
    deltas, detok = stream(tokenizer, ids, tuple(case["request"].get("stop", ())), fast=fast)
    assert ("".join(deltas), detok.stop_string) == (case["text"], case["stop_reason"])
    assert all(REPLACEMENT not in d for d in deltas)


def _streamed(tokenizer, ids: list[int], skip: bool, fast: bool) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip, fast=fast)
    deltas = [detok.add(t) for t in ids]
    return deltas + [detok.flush()], detok


@pytest.mark.parametrize("skip", [True, False])
def test_fast_and_window_paths_equal_decode_with_specials_and_byte_pieces(tokenizer, skip):
    """Random ids over the whole vocabulary (lone UTF-8 byte pieces included) with special tokens
    mixed in: every prefix of the stream is a prefix of ``decode`` and the whole equals it."""
    gen = torch.Generator().manual_seed(0)
    specials = sorted(set(tokenizer.all_special_ids))
    ids = torch.randint(0, len(tokenizer), (300,), generator=gen).tolist()
    ids[5:5] = specials  # at the start of a window
    ids += tokenizer.encode(TEXT, add_special_tokens=False) + specials[:1]
    want = tokenizer.decode(ids, skip_special_tokens=skip)
    assert stream_backend(tokenizer) is not None or DecodeStream is None  # the fast path where it exists
    for fast in (True, False):
        deltas, detok = _streamed(tokenizer, ids, skip, fast)
        assert (detok._stream is not None) == (fast and DecodeStream is not None)
        assert "".join(deltas) == want
        assert all(REPLACEMENT not in d for d in deltas[:-1] if REPLACEMENT not in want)


def test_stream_failure_hands_over_to_the_window_path(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)

    class Failing:  # a DecodeStream that raises on its 6th token (tokenizers raises on odd vocabularies)
        calls = 0

        def step(self, backend, token_id):
            self.calls += 1
            if self.calls == 6:
                raise Exception("Invalid prefix encountered")  # noqa: TRY002 (what the Rust side raises)
            return real.step(backend, token_id)

    detok = IncrementalDetokenizer(tokenizer)
    if detok._stream is None:
        pytest.skip("this tokenizers has no DecodeStream: the window path is the only path")
    real, detok._stream = detok._stream, Failing()
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert detok._stream is None and "".join(deltas) == TEXT
    assert all(REPLACEMENT not in d for d in deltas)


def test_space_clean_up_keeps_the_window_path(tokenizer):
    class CleaningUp:  # decode() would clean up tokenization spaces: DecodeStream's text would differ
        _tokenizer = tokenizer._tokenizer
        clean_up_tokenization_spaces = True

    assert stream_backend(CleaningUp()) is None


@pytest.mark.parametrize("fast", [True, False], ids=["stream", "window"])
@pytest.mark.parametrize("text, min_tokens, stop, want", [
    # "a b c d e f" is 6 tokens, "a" " b" " c" " d" " e" " f": min_tokens 3 covers "a b c" (5 chars)
    ("a b c d e f", 0, " ", "a"),
    ("a b c d e f", 3, " ", "a b c"),  # the spaces inside "a b c" do not count
    ("a b c d e f", 3, "c d", "a b "),  # straddles the boundary: ends past it, so it counts (as vLLM)
    ("a b c d e f", 3, "b c", None),  # ends inside the first 3 tokens' text: never counts
    ("a b c d e f", 2, "b c", "a "),  # "a b" is the boundary now: "b c" straddles it
    ("a b c d e f", 6, " ", None),  # every token is within min_tokens
    # 3 tokens per emoji: after 4 tokens the text is one emoji (the 2nd is incomplete, held back)
    ("😀😀😀 日本語", 4, "😀", "😀"),
    ("😀😀😀 日本語", 2, "😀", ""),  # nothing decoded after 2 tokens: the 1st emoji ends past it
])
def test_stop_strings_count_only_past_the_min_tokens_text(tokenizer, fast, text, min_tokens, stop, want):
    """vLLM's rule (vllm-project/vllm#22014): a stop string counts only where it ends past the text
    of the first min_tokens tokens; ``want`` None = no stop, the whole text. Expected cuts by hand."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    deltas, detok = stream(tokenizer, ids, (stop,), fast=fast, min_tokens=min_tokens)
    assert detok.stopped == (want is not None)
    assert "".join(deltas) == (text if want is None else want)


@pytest.mark.parametrize("fast", [True, False], ids=["stream", "window"])
def test_a_partial_character_flushed_within_min_tokens_completes_no_stop_string(tokenizer, fast):
    """Every token within min_tokens, the last leaving a partial character (never written, as vLLM's):
    a stop string U+FFFD or the whole decode does not count (a U+FFFD flushed once did: fuzzing found it)."""
    ids = tokenizer.encode("😀", add_special_tokens=False)[:2]  # 3 tokens per emoji: 2 leave it incomplete
    assert tokenizer.decode(ids).endswith(REPLACEMENT)
    for stop in (REPLACEMENT, tokenizer.decode(ids)):
        deltas, detok = stream(tokenizer, ids, (stop,), fast=fast, min_tokens=2)
        assert not detok.stopped
        assert "".join(deltas) == tokenizer.decode(ids).removesuffix(REPLACEMENT)


def _wordpiece_tokenizer():
    """A BERT-style tokenizer (WordPiece decoder: ``decode`` puts a space before every word and
    special token), with the special tokens [CLS] and [SEP] and the added, not special, token <x>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5, "<x>": 6}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    backend.add_special_tokens([AddedToken("[CLS]", special=True), AddedToken("[SEP]", special=True)])
    backend.add_tokens([AddedToken("<x>", special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("fast", [True, False], ids=["decode_stream", "window"])
def test_spaces_between_special_tokens_false_joins_adjacent_added_tokens(fast):
    """vLLM 0.32's FastIncrementalDetokenizer with skip_special_tokens and spaces_between_special_tokens
    false: an added token (special or not) right after another added token is its bare text; the
    rest is decoded as usual. By hand from that rule (vLLM's own class, run on this tokenizer in its
    venv, gives the same string): of "hello [CLS] [SEP] worlds [SEP] <x> [CLS] <x> <x> hello" (decode's
    text) the four pairs lose their space. The flag on, or with skip_special_tokens, the text is decode's."""
    tokenizer = _wordpiece_tokenizer()
    ids = [3, 1, 2, 4, 5, 2, 6, 1, 6, 6, 3]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "hello [CLS] [SEP] worlds [SEP] <x> [CLS] <x> <x> hello"
    for skip, spaces, want in ((False, False, "hello [CLS][SEP] worlds [SEP]<x>[CLS]<x><x> hello"),
                               (False, True, tokenizer.decode(ids, skip_special_tokens=False)),
                               (True, False, tokenizer.decode(ids, skip_special_tokens=True))):
        deltas, detok = stream(tokenizer, ids, fast=fast, skip_special_tokens=skip,
                               spaces_between_special_tokens=spaces)
        assert (detok._stream is not None) == (fast and DecodeStream is not None)
        assert "".join(deltas) == want, (skip, spaces)
        if not skip and not spaces:  # token by token as vLLM's decode_next returns them
            assert deltas == ["hello", " [CLS]", "[SEP]", " world", "s", " [SEP]", "<x>", "[CLS]", "<x>", "<x>",
                              " hello", ""]
