"""``tool_choice: "auto"``'s tool-call parsers (``serve --enable-auto-tool-choice --tool-call-parser
NAME``): the model's own tool-call text -> OpenAI tool calls, as vLLM 0.32's parsers of the same
names read it (vllm/tool_parsers/hermes_tool_parser.py, llama_tool_parser.py). No I/O.

- ``hermes`` (Hermes 2 Pro, Qwen2.5, Qwen3): each call is ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`` (the last one may lack its closing tag). The content is the text before the
  first ``<tool_call>``. The tags may be special tokens (Qwen's are added tokens): the request's
  text keeps special tokens (openai.py's ``sampling_of``), as vLLM's parser asks.
- ``llama3_json`` (Llama 3.1 / 3.2 / 3.3): calls are JSON objects ``{"name": ..., "parameters":
  {...}}`` (or ``"arguments"``), optionally after ``<|python_tag|>``, several joined by ``; ``.
  A whole answer's calls are every such object in the text; its content is then null. Streamed, the
  answer is calls only when it starts with ``{`` or ``<|python_tag|>``, else it is content.

A call's ``arguments`` are ``json.dumps`` of the parsed value in a whole answer; streamed, the
argument text as the model wrote it (vLLM's hermes streams that too; its llama3_json streams
``json.dumps`` of partial parses, the same JSON value), but for calls that all come in the last
delta, which is read as a whole answer. A call that does not parse (bad JSON, a
missing ``name`` or arguments key) leaves the whole text as content with no calls, as vLLM's.
"""

from __future__ import annotations

import json
import re

from nlora_serve.serving.http_api.tool_stream import Scanner
from nlora_serve.serving.http_api.tools import ToolCalls, call_id

TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # serving/server_config.py lists the same names
_START, _END = "<tool_call>", "</tool_call>"
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def parse_whole(parser: str, text: str) -> tuple[list[tuple[str, str]], str | None]:
    """(calls as (name, arguments JSON text), content) of a whole answer ``text``; no calls: the
    text as content. Content of only whitespace beside calls is None (vLLM's serving rule).

    Raises:
        ValueError: an unknown ``parser``.
    """
    if parser not in TOOL_CALL_PARSERS:  # before the try, which takes a ValueError for text that does not parse
        raise ValueError(f"unknown tool call parser {parser!r}; known: {', '.join(TOOL_CALL_PARSERS)}")
    try:
        calls, content = _hermes(text) if parser == "hermes" else _llama(text)
    except (ValueError, KeyError, TypeError):  # a call that does not parse: all text, as vLLM's
        return [], text
    if not calls:
        return [], text
    return calls, content if content and content.strip() else None


def auto_answer(tools: ToolCalls, text: str) -> tuple[list[dict], str | None]:
    """("auto"'s tool calls as chat's ``tool_calls`` entries, content) of a whole answer ``text``
    by ``tools.parser`` (no calls: ``[]`` and the text); ``parallel`` False keeps the first call
    (vLLM's maybe_filter_parallel_tool_calls)."""
    calls, content = parse_whole(tools.parser, text)
    if not tools.parallel:
        calls = calls[:1]
    return [{"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in calls], content


def _hermes(text: str) -> tuple[list[tuple[str, str]], str | None]:
    if _START not in text:
        return [], text
    calls = []
    for closed, open_ in _HERMES.findall(text):
        obj = json.loads(closed or open_)
        calls.append((_name(obj), json.dumps(obj["arguments"], ensure_ascii=False)))
    return calls, text[:text.find(_START)]


def _llama(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Every JSON object found from a ``{`` on (a nested one is read as part of its parent)."""
    calls, decoder, pos = [], json.JSONDecoder(), 0
    while (start := text.find("{", pos)) >= 0:
        obj, end = decoder.raw_decode(text, start)
        arguments = obj["arguments"] if "arguments" in obj else obj["parameters"]
        calls.append((_name(obj), json.dumps(arguments, ensure_ascii=False)))
        pos = end
    return calls, None


def _name(obj: dict) -> str:
    name = obj["name"]
    if not isinstance(name, str):
        raise TypeError("a call's name is not a string")
    return name


class AutoStream:
    """The streamed deltas of one choice under ``"auto"`` (vLLM's ``extract_tool_calls_streaming``
    of the named parser): ``content`` for text outside calls, and per call ``tool_calls`` entries by
    ``index``: first ``{"id", "type", "index", "function": {"name"}}`` once its name is complete
    and its arguments' value has begun, then ``{"index", "function": {"arguments"}}`` with each new
    piece of its argument text. The text is read once (a
    :class:`~nlora_serve.serving.http_api.tool_stream.Scanner` per call, each fed its call's text
    as it grows); argument spans are prefix-stable, so only new text is sent.

    A stream says what a whole answer (:func:`parse_whole`) says wherever it can know it in time
    (tests/http/test_tool_stream_whole.py), where vLLM's streams differ from its whole answers:
    a call is not announced before its arguments begin (vLLM's announces ``{"name": "f"}``, then
    ``{}``; its whole answer has no call); text held back as a possible call that never became one
    (a ``<tool_call>`` without a name or arguments, a ``{...}`` that is not a call) is sent as
    content with the finishing delta (vLLM's drop it); hermes' blank text before its first call is
    not sent (vLLM's sends it; its whole answer's content is None); llama3_json reads a call from
    each ``{`` after the one before, whatever lies between (vLLM's skips two characters). Not
    known in time, so as vLLM's: a call announced whose JSON later breaks, or whose answer has a
    broken call after it (a whole answer then has no calls, all text content); llama3_json's text
    that does not start with ``{`` or ``<|python_tag|>`` (content; a whole answer takes the calls
    in it, as vLLM's).

    Args:
        parser: one of :data:`TOOL_CALL_PARSERS`.
        parallel: False sends the first call only (``parallel_tool_calls: false``).
    """

    def __init__(self, parser: str, parallel: bool = True) -> None:
        if parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool call parser {parser!r}; known: {', '.join(TOOL_CALL_PARSERS)}")
        self.parser, self.parallel = parser, parallel
        self.text = ""
        self._sent = 0  # characters of text sent as content
        self._args: list[str] = []  # per announced call: its argument text sent
        self._scanners: dict[int, Scanner] = {}  # per call's start in the text (llama3_json: one, at 0)
        self._first = -1  # hermes: where the first <tool_call> starts (-1: none yet)
        self._closed: list = [0]  # hermes: where a next <tool_call> may start, then the closed calls' regions
        self._final = 0  # leading calls closed and announced: they send nothing more
        self.any_call = False  # a call was announced: the choice finishes "tool_calls"

    def delta(self, text: str, finished: bool = False) -> dict:
        """The delta message of ``text`` (``{}`` when it sends nothing): ``{"content": ...}``,
        ``{"tool_calls": [...]}`` or (hermes) ``{"content": str | None, "tool_calls": [...]}``."""
        self.text += text
        if finished and not self._args and (self.parser == "hermes" or self.text.startswith(("{", _PYTHON_TAG))):
            return self._whole()  # all text known and no call sent: the rest of the whole answer
        if self.parser == "hermes":
            if self._first < 0:  # searched from where the text searched before could start a tag
                self._first = self.text.find(_START, max(0, len(self.text) - len(text) - len(_START) + 1))
            cut = self._first
            if cut < 0:  # hold back what may be the start of a tag
                cut = len(self.text) - _overlap(self.text, _START)
            regions = _hermes_regions(self.text, self._scanners, self._closed) if self._first >= 0 else []
        elif self.text.startswith(("{", _PYTHON_TAG)):
            cut, regions = 0, _llama_regions(self.text, self._scanners, self._final)
        elif _PYTHON_TAG.startswith(self.text):  # a tag split over deltas is held
            cut, regions = 0, []
        else:
            cut, regions = len(self.text), []
        calls = self._calls(regions)
        # the leading announced calls that are closed send nothing more: later deltas skip them
        if self.parser == "hermes":
            self._final = min(len(self._closed) - 1, len(self._args))
        else:
            spans = self._scanners[0].spans if self._scanners else []
            while self._final < len(self._args) and spans[self._final].closed:
                self._final += 1
        if finished and not self.any_call:
            cut = len(self.text)  # nothing became a call: the held text is content
        elif self._sent == 0 and self.parser == "hermes" and self.text[:cut].isspace():
            cut = 0  # blank content before a call is None in a whole answer: held until it is not blank
        content = self.text[self._sent:cut] if cut > self._sent else None
        self._sent = max(self._sent, cut)
        if not calls:
            return {"content": content} if content else {}
        return {"content": content, "tool_calls": calls} if self.parser == "hermes" else {"tool_calls": calls}

    def _whole(self) -> dict:
        """The finishing delta of a stream that announced no call: the rest of :func:`auto_answer`'s
        answer of the whole text (its content after the content sent)."""
        calls, content = parse_whole(self.parser, self.text)
        calls = calls if self.parallel else calls[:1]
        rest = (content or "")[self._sent:] or None
        self._sent, self.any_call = len(self.text), bool(calls)
        if not calls:
            return {"content": rest} if rest else {}
        entries = []
        for index, (name, arguments) in enumerate(calls):
            entries += [{"id": call_id(), "type": "function", "index": index, "function": {"name": name}},
                        {"index": index, "function": {"arguments": arguments}}]
        return {"content": rest, "tool_calls": entries} if self.parser == "hermes" else {"tool_calls": entries}

    def _calls(self, regions: list[tuple[str | None, str | None]]) -> list[dict]:
        """The new entries of the calls' (name, argument text so far) ``regions``, in order."""
        out = []
        for index in range(self._final, len(regions)):
            name, args = regions[index]
            if index == len(self._args):
                if name is None or args is None:
                    break  # announced once its arguments begin (a whole answer needs them), after every call before it
                self._args.append("")
                if self.parallel or index == 0:
                    out.append({"id": call_id(), "type": "function", "index": index, "function": {"name": name}})
            sent = self._args[index]
            if args is not None and len(args) > len(sent) and args.startswith(sent):
                self._args[index] = args
                if self.parallel or index == 0:
                    out.append({"index": index, "function": {"arguments": args[len(sent):]}})
        self.any_call = self.any_call or bool(self._args)
        return out


def _overlap(text: str, tag: str) -> int:
    """The length of the longest proper prefix of ``tag`` that ``text`` ends with."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


def _hermes_regions(text: str, scanners: dict[int, Scanner], closed: list) -> list[tuple[str | None, str | None]]:
    """Per ``<tool_call>`` of ``text``: (name, argument text so far) of its JSON body, read by
    ``scanners`` (by the body's start; a body only grows: the held end is a tag's prefix). ``closed``:
    [where a next call may start (after the last closed call, and the text searched before), the
    regions of the closed calls], kept across calls, so that each delta reads only the text after them."""
    out, pos = closed[1:], closed[0]
    while True:
        start = text.find(_START, pos)
        if start < 0:  # no call starts before the tag's length from the end
            closed[0] = max(pos, len(text) - len(_START) + 1)
            break
        start += len(_START)
        end = text.find(_END, start)
        body = text[start:] if end < 0 else text[start:end]
        if end < 0:  # an unfinished call: not the part of </tool_call> it may end with
            body = body[:len(body) - _overlap(body, _END)]
        scanner = scanners.get(start) or scanners.setdefault(start, Scanner(("arguments",)))
        out.append(_region(scanner.feed("[" + body), "[" + body))
        if end < 0:
            break
        pos = end + len(_END)
        closed[0] = pos
        closed.append(out[-1])
        scanners.pop(start, None)
    return out


def _llama_regions(text: str, scanners: dict[int, Scanner], first: int) -> list[tuple[str | None, str | None]]:
    """Per JSON object after the optional ``<|python_tag|>``: (name, argument text so far); the
    ``first`` ones (closed and sent) as None."""
    body = "[" + text.removeprefix(_PYTHON_TAG)
    scanner = scanners.get(0) or scanners.setdefault(0, Scanner(("parameters", "arguments"), loose=True))
    spans = scanner.feed(body)
    return [None] * first + [_region([span], body) for span in spans[first:]]


def _region(spans: list, body: str) -> tuple[str | None, str | None]:
    if not spans:
        return None, None
    span = spans[0]
    if span.args_start is None:
        return span.name, None
    return span.name, body[span.args_start:span.args_end if span.args_end is not None else len(body)]
