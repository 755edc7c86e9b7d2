"""Incremental detokenization for streaming.

Fast path (vLLM's FastIncrementalDetokenizer): the tokenizers library's ``DecodeStream`` steps the
Rust decoder one token at a time and returns text only once it forms whole UTF-8 characters
(about 1 µs a token, against two transformers ``decode`` calls in the window path). Where it is
missing (tokenizers < 0.21), where the tokenizer is not a Rust one, or where ``decode`` would
clean up tokenization spaces (text DecodeStream does not produce), and for the rest of a request
whose stream raised, the window path: each new token is decoded in a small window of recent
tokens (the offsets scheme of vLLM and text-generation-inference): ``decode(window + new)``
minus ``decode(window)`` is the new text, and text ending in U+FFFD (an incomplete UTF-8
sequence) is held back until later tokens complete it. While stop strings are set the last
``len(longest stop) - 1`` characters are held back too, so no streamed delta is ever retracted
(none with ``include_stop``, vLLM's include_stop_str_in_output: the text then ends where the first
stop string to complete ends, so every character before that point is final).
With ``min_tokens`` a stop string counts only where it ends past the text of the first
``min_tokens`` tokens (vLLM's rule since vllm-project/vllm#22014: once the output holds
``min_tokens`` tokens it searches only text decoded after them, so a stop string may begin inside
that text, straddling the boundary, but must end beyond it).
:meth:`IncrementalDetokenizer.flush` re-decodes everything once at the end, so the deltas always
join to ``tokenizer.decode(ids)`` (cut at a stop string), less a dangling partial character at its
end (``decode``'s trailing U+FFFD: the bytes of a character the last tokens leave incomplete), which
vLLM 0.32 never writes either (its ``FastIncrementalDetokenizer`` holds them; "は、メ", not "は、メ\ufffd").
A U+FFFD the text really ends in is dropped too (both paths hold it back as incomplete, as vLLM's).

``spaces_between_special_tokens=False`` with ``skip_special_tokens=False`` (vLLM's fields) is vLLM
0.32's ``FastIncrementalDetokenizer`` rule: an added token (special or not: the tokenizer's added
tokens) right after another added token of the output is its bare text, without the space a decoder
may put before it (a WordPiece decoder writes ``[CLS] [SEP]``, this ``[CLS][SEP]``); every other token
is decoded as usual. The text then differs from ``decode`` where such a pair occurs, so the flush
keeps it (it takes ``decode``'s text only where the text so far is a prefix of it). With
``skip_special_tokens`` the flag changes nothing (vLLM's too).
"""

from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21: the window path only
    DecodeStream = None

REPLACEMENT = "\ufffd"
WINDOW = 5  # tokens of context the window path re-decodes when it takes over (vLLM's initial offset)


def stream_backend(tokenizer):
    """The Rust tokenizer a ``DecodeStream`` can step for ``tokenizer``, or None where the stream
    would not give ``tokenizer.decode``'s text (no DecodeStream, a Python tokenizer, space clean-up)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if DecodeStream is None or backend is None or not hasattr(backend, "decode"):
        return None
    return None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text deltas."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: tuple[str, ...] = (),
                 fast: bool = True, min_tokens: int = 0, include_stop: bool = False,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        # ``fast``: use DecodeStream where it gives the same text (False: the window path, for the bench)
        self._backend = stream_backend(tokenizer) if fast else None
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self._backend is not None else None
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop  # the text keeps the stop string (it ends where the string ends)
        # chars a stop string could still claim (none when it is kept)
        self.hold = 0 if include_stop else max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (complete characters only until flush)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False  # a stop string was found; ``text`` ends right before it
        self.stop_string: str | None = None  # the stop string that ended the text, once stopped
        self.min_tokens = min_tokens
        # characters of ``text`` decoded from the first min_tokens tokens: a stop string must end
        # past them; None until min_tokens tokens have been added (no stop string counts yet)
        self._stop_after: int | None = 0 if min_tokens == 0 else None
        self._prefix_offset = 0  # window start: tokens before it are in ``text`` for good
        self._read_offset = 0  # tokens before it are in ``text``
        # spaces_between_special_tokens=False: the added tokens' {id: text}, and whether the last
        # token was one (module docstring); None: the flag is on, or changes nothing
        self._added: dict[int, str] | None = None
        self._last_added = False
        if not skip_special_tokens and not spaces_between_special_tokens:
            self._added = {t: token.content for t, token in tokenizer.added_tokens_decoder.items()} or None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text that can be streamed now (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        joined = self._joined(token_id)  # its bare text, or None
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, token_id)  # stepped anyway: the stream keeps its state
            except Exception:  # noqa: BLE001 (the Rust side raises plain Exception): the window path takes over
                self._stream = None
                self._prefix_offset = max(0, self._read_offset - WINDOW)
            else:
                chunk = chunk if joined is None else joined
                if chunk:
                    self.text += chunk
                    self._read_offset = len(self.ids)
                return self._release(final=False)
        if joined is not None:  # the previous token was added too, so all before it is in ``text``
            self.text += joined
            self._prefix_offset, self._read_offset = len(self.ids) - 1, len(self.ids)
            return self._release(final=False)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        window = self._decode(self.ids[self._prefix_offset:])
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT):
            self.text += window[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release(final=False)

    def _joined(self, token_id: int) -> str | None:
        """With spaces_between_special_tokens off: ``token_id``'s bare text where it and the token
        before it are added tokens (vLLM's ``last_special``, False at the output's start); else None."""
        if self._added is None:
            return None
        text = self._added.get(token_id)
        joined = text if text is not None and self._last_added else None
        self._last_added = text is not None
        return joined

    def flush(self) -> str:
        """The request ended: return all text not yet streamed but a dangling partial character
        (vLLM 0.32's: its detokenizer never writes the bytes of an incomplete character)."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text):  # always, for byte-level and sentencepiece tokenizers
                # the tail decode writes as U+FFFD: the bytes no later token completes
                self.text = self.text + full[len(self.text):].rstrip(REPLACEMENT)
            if len(self.ids) <= self.min_tokens:
                # every token is within min_tokens: the text the flush adds is theirs too, so no
                # stop string may end in it
                self._stop_after = len(self.text)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop_after is None and len(self.ids) >= self.min_tokens:  # called once per token added
            self._stop_after = len(self.text)
        # where the text ends at each stop string found: before it, or after it with include_stop
        # (nothing is held back then: the string may begin in text already sent)
        kept = self.include_stop
        hits = [] if self._stop_after is None else [
            (i + (len(s) if kept else 0), s)
            # from 0 at least: str.find reads a negative start from the end (a stop string in the
            # first len(s) - 1 characters of the text, kept, was never found)
            for s, i in ((s, self.text.find(s, max(0, self.sent - (len(s) - 1 if kept else 0),
                                                   self._stop_after - len(s) + 1))) for s in self.stop)
            if i >= 0]
        if hits and not self.stopped:
            end, self.stop_string = min(hits, key=lambda hit: hit[0])
            self.text = self.text[:end]
            self.stopped = final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta
