"""A token's string and raw bytes, for the logprobs of a response (:class:`TokenText`, :class:`TokenBytes`).

A token's string is its own decoding, ``decode([id])``, decoded once per server and kept
(:class:`TokenText`), but where that ends in U+FFFD (a byte-level token ending inside a multi-byte
character) and the token has a place in a sequence: then, as vLLM 0.32's
``LogprobsProcessor._correct_decoded_token``, its text after up to 4 tokens before it
(:meth:`TokenText.in_context`), "" while the character is still incomplete. A response with
``prompt_logprobs`` names up to 21 tokens per prompt position (1,024 prompts of a batch, each up to
``max_model_len``), and ``decode`` costs ~20 us a call, all of it on the thread that shapes the
response.

OpenAI's ``bytes`` is the token's UTF-8 bytes, there so that a client can rebuild characters split
across tokens. The token's string (``decode([id])``) cannot give them: a byte-level token holding
part of a multi-byte character decodes to U+FFFD. They come from the vocabulary entry instead:

- byte-level BPE (GPT-2, SmolLM2, Llama 3: a ``ByteLevel`` decoder): each character of the entry
  stands for one byte under GPT-2's byte-to-unicode map (openai/gpt-2 ``encoder.py``);
- SentencePiece with byte fallback (Llama 2, Mistral: a ``ByteFallback`` decoder): an entry
  ``<0xNN>`` is byte NN, and ``▁`` in any other entry a space;
- added tokens (special tokens included) are stored as their own text: its UTF-8;
- any other tokenizer: the UTF-8 of ``decode([id])``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: the 188 printable Latin-1 bytes stand for their own
    character, the other 68 (controls, space, ...) for U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHAR = _byte_of_char()
REPLACEMENT = "\ufffd"


class TokenText:
    """``token_text(token_id) -> str``: ``tokenizer.decode([token_id])`` (a transformers tokenizer),
    each id decoded once and kept: at most one string per vocabulary entry (ids are checked against
    the vocabulary before they run, and the model names no others). Safe across threads: a race
    decodes an id twice and keeps either, equal, string."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def in_context(self, token_id: int, context: Sequence[int]) -> str:
        """``token_id``'s string after the sequence tokens ``context`` (oldest first; the last 4 are
        read), vLLM 0.32's: its own decoding unless that ends in U+FFFD; then the text it adds after
        the fewest trailing context tokens with which it ends a character, counting the text of the
        context's own trailing partial tokens (each "" where it came) as its; "" when none does."""
        text = self(token_id)
        if not text.endswith(REPLACEMENT):
            return text
        context = list(context[-4:])
        for size in range(1, len(context) + 1):
            before = context[-size:]
            full = self.tokenizer.decode(before + [token_id])
            if full.endswith(REPLACEMENT):
                continue
            clean = len(before)  # the context tokens before its trailing partial ones
            while clean > 0 and self(before[clean - 1]).endswith(REPLACEMENT):
                clean -= 1
            prefix = self.tokenizer.decode(before[:clean]) if clean else ""
            if full.startswith(prefix):
                return full[len(prefix):]
            common = 0  # the tokenizer normalized the joint text: after the common prefix
            while common < min(len(prefix), len(full)) and prefix[common] == full[common]:
                common += 1
            return full[common:]
        return ""


class TokenBytes:
    """``token_bytes(token_id) -> bytes`` for one tokenizer (a transformers tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = repr(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None))
        self.byte_level = "ByteLevel" in decoder
        self.byte_fallback = not self.byte_level and "ByteFallback" in decoder
        self.added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}

    def __call__(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        if self.byte_level or self.byte_fallback:
            entry = self.tokenizer.convert_ids_to_tokens(token_id)
            if self.byte_level and all(c in BYTE_OF_CHAR for c in entry):
                return bytes(BYTE_OF_CHAR[c] for c in entry)
            if self.byte_fallback:
                byte = _BYTE_FALLBACK.fullmatch(entry)
                return bytes([int(byte.group(1), 16)]) if byte else entry.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()
