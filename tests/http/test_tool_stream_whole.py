"""tool_choice "auto": a streamed answer (http_api/tool_parsers.py's ``AutoStream``, put together
as a client does: content joined, each call's name and argument pieces joined by index) says what
the whole answer (``parse_whole``, vLLM 0.32's whole answer: tests/http/test_http_auto_tools.py
checks it against vLLM's own parsers) says, however the text is cut into deltas: the content, the
calls' names and arguments (the same JSON: a hermes stream sends the model's argument text, a
whole answer ``json.dumps`` of it, as vLLM's) and the finish reason ("tool_calls" when calls came).

Hypothesis writes the model's text (calls with nested values, strings holding braces, quotes,
escaped quotes, tags and multi-code-point characters, text around and between the calls, several
calls, empty arguments, unclosed tags) and the cuts; derandomized, with a fixed number of
examples (CI time). Broken text (bad JSON, missing keys, unclosed tags and objects, stray
brackets) is checked for what a stream can know in time: a call announced before its JSON broke
stays (as vLLM's); otherwise the stream says what the whole answer says.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nlora_serve.serving.http_api.tool_parsers import AutoStream, parse_whole

SETTINGS = settings(max_examples=40, derandomize=True, deadline=None, database=None)
START, END, TAG = "<tool_call>", "</tool_call>", "<|python_tag|>"
# characters that trouble a scanner: braces, brackets, quotes, backslashes, tags' pieces, non-ASCII
# (é as one code point and as e + a combining accent, a surrogate-pair emoji with a skin-tone modifier)
TRICKY = st.sampled_from(["a", " ", "{", "}", "[", "]", '"', "\\", ":", ",", "<", ">", "/", "\n", "é", "e\u0301",
                          "日", "😀", "👍🏽", "<tool_call>", "<|python_tag|>", "tool_call"])
WS = st.sampled_from(["", "", " ", "\n", " \n  "])


def _text(forbid: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    return st.lists(TRICKY, max_size=5).map("".join).filter(lambda s: not any(f in s for f in forbid))


def _values(forbid: tuple[str, ...]) -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | _text(forbid) | st.floats(
        allow_nan=False, allow_infinity=False, width=32)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        _text(forbid), inner, max_size=3), max_leaves=8)


@st.composite
def call_json(draw, args_key: str, forbid: tuple[str, ...] = ()) -> str:
    """One call object as a model writes it: keys in any order, any spacing, maybe an extra key."""
    args = draw(st.sampled_from([{}, {"a": {"b": {"c": "}{"}}}]) | st.dictionaries(_text(forbid), _values(forbid),
                                                                               max_size=3) | _values(forbid))
    ascii_, indent = draw(st.booleans()), draw(st.sampled_from([None, None, 1]))
    fields = [("name", draw(st.sampled_from(["f", "get_weather", "ns.tool", 'q"x', "é", ""]))), (args_key, args)]
    if draw(st.integers(0, 9)) == 0:
        fields.append(("extra", 1))
    fields = draw(st.permutations(fields))
    colon, comma = draw(st.sampled_from([": ", ":", " : "])), draw(st.sampled_from([", ", ",", ",\n "]))
    return "{" + draw(WS) + comma.join(json.dumps(k) + colon + json.dumps(v, ensure_ascii=ascii_, indent=indent)
                                       for k, v in fields) + draw(WS) + "}"


@st.composite
def hermes_text(draw) -> str:
    """Text, then calls in tags (the last may be unclosed), text between and after closed calls."""
    out = draw(_text((START,)))
    n = draw(st.integers(0, 3))
    for i in range(n):
        out += START + draw(WS) + draw(call_json("arguments", (END,))) + draw(WS)
        if i < n - 1 or draw(st.integers(0, 4)):
            out += END + draw(_text((START,)))
    return out


@st.composite
def llama_text(draw) -> str:
    """Calls from the start (after an optional <|python_tag|>), joined by anything without a brace."""
    out = draw(st.sampled_from(["", TAG]))
    n = draw(st.integers(1, 3))
    for i in range(n):
        out += draw(call_json(draw(st.sampled_from(["parameters", "arguments"]))))
        out += draw(st.sampled_from(["}; ", "; ", "]\n", ";", ", "]) if i < n - 1 else _text(("{",)))
    return out


def broken(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``text`` cut short, with a call's arguments key renamed, a character dropped or doubled, or
    a stray bracket, tag or key added."""
    @st.composite
    def edit(draw) -> str:
        s = draw(text)
        i = draw(st.integers(0, len(s)))
        kind = draw(st.sampled_from(["unkey", "cut", "drop", "double", "insert"]))
        if kind == "unkey":
            return s.replace(draw(st.sampled_from(['"arguments"', '"parameters"'])), '"argz"', 1)
        if kind == "cut":
            return s[:i]
        if kind == "drop":
            return s[:i] + s[i + 1:]
        if kind == "double":
            return s[:i] + s[i:i + 1] + s[i:]
        return s[:i] + draw(st.sampled_from(["}", "]", "{", '"', ",", START, END, '"name": "g"'])) + s[i:]
    return edit()


@st.composite
def pieces(draw, text: st.SearchStrategy[str]) -> list[str]:
    """The text cut at any code points (inside tags, escapes, surrogate pairs' emoji, grapheme
    clusters), maybe with an empty finishing delta (a finishing token that adds no text)."""
    s = draw(text)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(s) - 1)), max_size=12)))) if len(s) > 1 else []
    out = [s[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)])]
    return out + [""] if draw(st.booleans()) else out


def streamed(parser: str, parts: list[str], parallel: bool = True) -> tuple[str | None, list[list[str]], bool, int]:
    """(content or None, [[name, argument text]] by index, a call came, the delta that announced
    the first call (-1: none)) of a stream fed ``parts``, the last one finishing."""
    stream, content, calls, first = AutoStream(parser, parallel), "", [], -1
    for i, part in enumerate(parts):
        delta = stream.delta(part, i == len(parts) - 1)
        assert set(delta) <= {"content", "tool_calls"}
        content += delta.get("content") or ""
        for entry in delta.get("tool_calls", []):
            if "id" in entry:  # announced in order, by name, before any of its arguments
                assert entry["index"] == len(calls) and entry["type"] == "function"
                assert set(entry["function"]) == {"name"}
                calls.append([entry["function"]["name"], ""])
                first = i if first < 0 else first
            else:
                assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
            calls[entry["index"]][1] += entry["function"].get("arguments", "")
    return content or None, calls, stream.any_call, first


def _json(calls: list) -> list:
    return [[name, json.loads(args)] for name, args in calls]


def check_same(parser: str, parts: list[str], parallel: bool = True) -> None:
    calls, content = parse_whole(parser, "".join(parts))
    calls = calls if parallel else calls[:1]  # auto_answer's parallel_tool_calls false
    got_content, got_calls, any_call, _ = streamed(parser, parts, parallel)
    assert got_content == (content or None)
    assert _json(got_calls) == _json(calls)  # a stream's argument text is JSON of the same value
    assert any_call == bool(calls)  # finish_reason "tool_calls" exactly when a whole answer has calls


@SETTINGS
@given(pieces(hermes_text()), st.booleans())
def test_hermes_streamed_in_any_pieces_is_the_whole_answer(parts, parallel):
    check_same("hermes", parts, parallel)


@SETTINGS
@given(pieces(llama_text()), st.booleans())
def test_llama3_json_streamed_in_any_pieces_is_the_whole_answer(parts, parallel):
    check_same("llama3_json", parts, parallel)


@SETTINGS
@given(st.sampled_from([("hermes", hermes_text()), ("llama3_json", llama_text())]).flatmap(
    lambda p: st.tuples(st.just(p[0]), pieces(broken(p[1])))))
def test_broken_text_streams_the_whole_answer_unless_a_call_came_before_it_broke(case):
    """Where a stream says other than the whole answer, the whole answer has no calls (all text:
    a call in it broke) and the stream had announced a call before its last delta, when the break
    could not be known; its content is then what it would be beside calls. Llama's text that does
    not start with a call is content (vLLM's rule, as its stream)."""
    parser, parts = case
    text = "".join(parts)
    calls, content = parse_whole(parser, text)
    got_content, got_calls, any_call, first = streamed(parser, parts)
    if parser == "llama3_json" and not text.startswith(("{", TAG)):
        assert (got_content, got_calls, any_call) == (text or None, [], False)
    elif (got_content, _json(got_calls) if calls else got_calls) == (content or None, _json(calls)):
        assert any_call == bool(calls)
    else:
        assert not calls and content == text and 0 <= first < len(parts) - 1
        before = text[:text.find(START)] if parser == "hermes" else ""
        assert got_content == (before if before.strip() else None)


HERMES = ('Sé 😀👍🏽 <tool_call>\n{"name": "f", "arguments": {"s": "}{\\"<tool_call>é", "n": {"k": [1, {}]}}}\n'
          '</tool_call>\n<tool_call>{"arguments": {}, "name": "g"}</tool_call> <tool_call>{"name": "h", "arguments": 1}')
LLAMA = '<|python_tag|>{"name": "f", "parameters": {"s": "}{\\"é😀"}}; {"arguments": {"a": []}, "name": "g"}'


def test_a_cut_at_every_code_point_and_code_point_by_code_point():
    """Every two-piece cut of texts with tags, escapes and multi-code-point characters, and one
    delta per code point: the whole answer's content and calls."""
    for parser, text in (("hermes", HERMES), ("llama3_json", LLAMA)):
        assert parse_whole(parser, text)[0]  # the texts hold calls
        for i in range(len(text) + 1):
            check_same(parser, [text[:i], text[i:]])
        check_same(parser, list(text))


@pytest.mark.parametrize("parser, parts", [
    ("llama3_json", ['{"name": "f"', " }"]),  # no arguments: was a call with "" arguments
    ("hermes", ['<tool_call>{"name": "f"', "}</tool_call>"]),  # no arguments: was a call with "{}"
    ("hermes", ["\n", '<tool_call>{"name": "f", "arguments": {}}</tool_call>']),  # blank content: was "\n"
    ("llama3_json", ['{"name": "f", "parameters": {}}}; {"name": "g", "parameters": {}}']),  # g was lost
    ("hermes", ['<tool_call>{"name": "f", "arguments": {}}}</tool_call>']),  # broken in the last delta:
    ("hermes", ['<tool_call>{"name": "f", "arguments": {}} x']),  # ... was a call
    ("llama3_json", ['{"name": "f", "parameters": {}]']),
])
def test_found_differences(parser, parts):
    """The differences these properties found, each on its smallest text (vLLM's whole answers on
    them: tests/data/vllm_tool_parsers.json): now the whole answer."""
    check_same(parser, parts)
