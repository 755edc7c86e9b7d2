"""Incremental detokenization for streaming.

Each new token is decoded in a small window of recent tokens (the offsets scheme of vLLM and
text-generation-inference): ``decode(window + new)`` minus ``decode(window)`` is the new text.
Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until later tokens complete it,
and while stop strings are set the last ``len(longest stop) - 1`` characters are held back too, so
no streamed delta is ever retracted. :meth:`IncrementalDetokenizer.flush` re-decodes everything
once at the end, so the deltas always join to ``tokenizer.decode(ids)`` (cut at a stop string).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text deltas."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars a stop string could still claim
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (complete characters only until flush)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False  # a stop string was found; ``text`` ends right before it
        self._prefix_offset = 0  # window start: tokens before it are in ``text`` for good
        self._read_offset = 0  # tokens before it are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text that can be streamed now (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        window = self._decode(self.ids[self._prefix_offset:])
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT):
            self.text += window[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The request ended: return all text not yet streamed (a dangling partial character included)."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text):  # always, for byte-level and sentencepiece tokenizers
                self.text = full
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits and not self.stopped:
            self.text = self.text[:min(hits)]
            self.stopped = final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta
