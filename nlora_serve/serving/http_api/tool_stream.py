"""Streamed tool calls of one chat choice, as vLLM 0.32 streams them (tool_parsers/streaming.py).

- a named function (:class:`NamedStream`): every delta's text is argument text; the first carries
  the call's id, type and name.
- ``"required"`` (:class:`RequiredStream`): the output is a JSON array of ``{"name", "parameters"}``
  objects; a call is announced (id, type, name, the ``parameters`` text so far) once its name is
  complete and its parameters have begun, then each delta sends the new text of every call's
  parameters, by the call's index. The text is scanned once (:class:`Scanner`), and what the previous
  text had already revealed is read off the same scan: the spans are prefix-stable (vLLM's
  ``_scan_required_tool_calls``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nlora_serve.serving.http_api.tools import call_id


class NamedStream:
    """A named function's tool-call deltas (vLLM's ``extract_named_tool_call_streaming``)."""

    def __init__(self, name: str) -> None:
        self.name, self.started = name, False

    def delta(self, text: str) -> dict:
        if self.started:
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        self.started = True
        return {"tool_calls": [{"id": call_id(), "type": "function", "index": 0,
                                "function": {"name": self.name, "arguments": text}}]}


class RequiredStream:
    """"required"'s tool-call deltas (vLLM's ``extract_required_tool_call_streaming``)."""

    def __init__(self) -> None:
        self.text = ""
        self.any_call = False  # a call was announced: the choice finishes "tool_calls"
        self._scanner = Scanner()  # reads each character once over the stream
        self._final = 0  # leading calls closed and sent whole

    def delta(self, text: str) -> dict:
        """The delta of ``text`` (``{}`` when it completes nothing new)."""
        previous, self.text = self.text, self.text + text
        calls, spans = [], self._scanner.feed(self.text)
        for index in range(self._final, len(spans)):
            span = spans[index]
            if not span.ready:
                break  # elements come in order: none after it is ready
            end = span.args_end if span.args_end is not None else len(self.text)
            if span.ready_at(len(previous)):
                new = self.text[min(end, len(previous)):end]
                if new:
                    calls.append({"index": index, "function": {"arguments": new}})
                continue
            calls.append({"id": call_id(), "type": "function", "index": index,
                          "function": {"name": span.name, "arguments": self.text[span.args_start:end]}})
        while self._final < len(spans) and spans[self._final].closed and spans[self._final].ready:
            self._final += 1  # all its text sent: later deltas skip it
        self.any_call = self.any_call or bool(calls)
        return {"tool_calls": calls} if calls else {}


@dataclass(slots=True)
class _Span:
    """One array element: its name once its string closed (``name_end`` just past the quote), and
    the character span of its ``parameters`` value (``args_end`` None while it is open)."""

    name: str | None = None
    name_end: int | None = None
    args_start: int | None = None
    args_end: int | None = None
    closed: bool = False  # its object's closing brace read

    @property
    def ready(self) -> bool:
        return self.name is not None and self.args_start is not None

    def ready_at(self, length: int) -> bool:
        """Whether the text's first ``length`` characters had made this call streamable."""
        return self.ready and self.name_end <= length and self.args_start < length


_KEY, _COLON, _VALUE, _STRING, _CONTAINER, _SCALAR, _AFTER = range(7)


def scan(text: str, args_keys: tuple[str, ...] = ("parameters",)) -> list[_Span]:
    """The elements of a (possibly partial) array of calls; text after its closing ``]`` is ignored.
    Only the element level (depth 2) is interpreted, so nested values and strings cannot confuse it;
    text between elements other than brackets is skipped (the ``; `` between Llama's calls).
    ``args_keys``: the keys whose value is a call's arguments. One pass: see :class:`Scanner`."""
    return Scanner(args_keys).feed(text)


class Scanner:
    """:func:`scan` resumed as the text grows: :meth:`feed` reads only the characters after those
    it read before, so a stream of n characters costs O(n), not O(n^2) (each delta re-read the whole
    text: 10,000 tokens of a call's arguments took 15-20 s of the event loop). Each character's
    effect depends only on the characters before it, so the spans equal ``scan`` of the whole text.

    ``loose``: False reads the text between elements as an array's (a bracket there ends it); True
    skips every character there but ``{`` (Llama's calls: a whole answer reads an object from each
    ``{`` after the one before, whatever lies between).
    """

    __slots__ = ("args_keys", "loose", "spans", "_pos", "_done", "_state")

    def __init__(self, args_keys: tuple[str, ...] = ("parameters",), loose: bool = False) -> None:
        self.args_keys, self.loose, self.spans, self._pos, self._done = args_keys, loose, [], 0, False
        # depth, in_string, escaped, string_start, value_start, cur, expect, key
        self._state = (0, False, False, 0, 0, None, _KEY, None)

    def feed(self, text: str) -> list[_Span]:  # noqa: C901 (one state machine)
        """The spans of ``text``, which extends every text fed before (raises ValueError if shorter)."""
        if len(text) < self._pos:
            raise ValueError("Scanner.feed: the text is shorter than the one fed before")
        if self._done:
            return self.spans
        args_keys, spans = self.args_keys, self.spans
        depth, in_string, escaped, string_start, value_start, cur, expect, key = self._state

        def end_value(pos: int) -> None:
            nonlocal expect
            if key in args_keys:
                cur.args_end = pos
            elif key == "name" and expect == _STRING:
                try:
                    cur.name, cur.name_end = json.loads(text[value_start:pos]), pos
                except ValueError:
                    cur.name = None
            expect = _AFTER

        def start_value(pos: int, state: int) -> None:
            nonlocal expect, value_start
            value_start = pos
            if key in args_keys:
                cur.args_start = pos
            expect = state

        loose = self.loose
        for i in range(self._pos, len(text)):
            ch = text[i]
            if loose and depth == 1 and ch != "{":
                continue  # between Llama's calls (never inside a string: none starts at depth 1 then)
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
                    if depth == 2 and cur is not None:
                        if expect == _KEY:
                            key, expect = text[string_start + 1:i], _COLON
                        elif expect == _STRING:
                            end_value(i + 1)
                continue
            if ch == '"':
                in_string, string_start = True, i
                if depth == 2 and cur is not None and expect == _VALUE:
                    start_value(i, _STRING)
            elif ch in "{[":
                if depth == 0 and ch != "[" or depth == 1 and ch != "{":
                    self._done = True
                    return spans
                if depth == 1:
                    cur = _Span()
                    spans.append(cur)
                    expect, key = _KEY, None
                elif depth == 2 and cur is not None and expect == _VALUE:
                    start_value(i, _CONTAINER)
                depth += 1
            elif ch in "}]":
                if depth == 2 and cur is not None and expect == _SCALAR:
                    end_value(i)
                depth -= 1
                if depth == 2 and cur is not None and expect == _CONTAINER:
                    end_value(i + 1)
                elif depth == 1:
                    if cur is not None:
                        cur.closed = True
                    cur = None
                elif depth <= 0:
                    self._done = True
                    return spans
            elif depth == 2 and cur is not None:
                if ch == ":":
                    if expect == _COLON:
                        expect = _VALUE
                elif ch == ",":
                    if expect == _SCALAR:
                        end_value(i)
                    expect, key = _KEY, None
                elif ch.isspace():
                    if expect == _SCALAR:
                        end_value(i)
                elif expect == _VALUE:
                    start_value(i, _SCALAR)
        self._pos = len(text)
        self._state = (depth, in_string, escaped, string_start, value_start, cur, expect, key)
        return spans
