"""A streamed tool call's text is read once (tool_stream.Scanner): every delta re-read the whole
text before, so a call of n characters cost O(n^2) of the event loop (10,000 tokens of arguments:
15-20 s). The spans of a scanner fed each prefix are those of one scan of that prefix."""

from __future__ import annotations

import random
import time

import pytest

from nlora_serve.serving.http_api.tool_parsers import AutoStream
from nlora_serve.serving.http_api.tool_stream import RequiredStream, Scanner, scan

_FRAGMENTS = ['{"name": "f", "parameters": {"a": [1, {"b": "}"}]}}', '{', '}', '[', ']', '"', '\\"', '\\', ',', ':',
              ' ', '"name"', '"parameters"', '"arguments"', '12', 'null', 'é😀', '; ', '"x\\u00e9"']


def test_a_scanner_fed_each_prefix_gives_the_spans_of_a_whole_scan():
    rng = random.Random(5)
    for _ in range(300):
        text = rng.choice(["[", "[{", ""]) + "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 20)))
        keys = rng.choice([("parameters",), ("parameters", "arguments")])
        scanner = Scanner(keys)
        for end in range(len(text) + 1):
            assert scanner.feed(text[:end]) == scan(text[:end], keys), text[:end]


def test_a_long_streamed_call_costs_linear_time():
    args = '{"text": "' + "x" * 20_000 + '"}'
    texts = {"hermes": '<tool_call>{"name": "write", "arguments": ' + args + "}</tool_call>",
             "llama3_json": '{"name": "write", "parameters": ' + args + "}"}
    start = time.perf_counter()
    for parser, text in texts.items():
        stream = AutoStream(parser)
        sent = [stream.delta(text[i:i + 4], i + 4 >= len(text)) for i in range(0, len(text), 4)]
        assert "".join(d["function"].get("arguments", "") for s in sent for d in s.get("tool_calls", [])) == args
    required, text = RequiredStream(), '[{"name": "write", "parameters": ' + args + "}]"
    sent = [required.delta(text[i:i + 4]) for i in range(0, len(text), 4)]
    assert "".join(d["function"]["arguments"] for s in sent for d in s.get("tool_calls", [])) == args
    assert time.perf_counter() - start < 1.0  # 3 x 5,000 deltas: ~0.1 s; each re-reading all the text: 10-15 s


@pytest.mark.parametrize("parser, one, count", [
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n', 500),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}; ', 1500)])
def test_many_streamed_calls_cost_linear_time(parser, one, count):
    text, stream, start = one * count, AutoStream(parser), time.perf_counter()
    sent = [stream.delta(text[i:i + 4], i + 4 >= len(text)) for i in range(0, len(text), 4)]
    assert time.perf_counter() - start < 1.0  # ~7,500-15,000 deltas: ~0.05-0.1 s; each re-reading every call: 2.7-3.5 s
    assert [d["function"]["name"] for s in sent for d in s.get("tool_calls", []) if "name" in d["function"]] == ["f"] * count
    assert "".join(d["function"].get("arguments", "") for s in sent for d in s.get("tool_calls", [])) == '{"a": 1}' * count


def test_many_required_calls_cost_linear_time():
    text = "[" + ", ".join(['{"name": "f", "parameters": {"a": 1}}'] * 1500) + "]"
    stream, start = RequiredStream(), time.perf_counter()
    sent = [stream.delta(text[i:i + 4]) for i in range(0, len(text), 4)]
    assert time.perf_counter() - start < 1.0  # 14,600 deltas: ~0.05 s; each re-reading every call: ~5 s
    assert "".join(d["function"]["arguments"] for s in sent for d in s.get("tool_calls", [])) == '{"a": 1}' * 1500


def test_long_plain_text_under_hermes_costs_linear_time():
    text = ("plain words <b> here " * 8000)[:160_000]  # 40,000 deltas of text that holds no call
    stream, start = AutoStream("hermes"), time.perf_counter()
    sent = [stream.delta(text[i:i + 4], i + 4 >= len(text)) for i in range(0, len(text), 4)]
    assert time.perf_counter() - start < 1.5  # ~0.25 s; each delta searching all the text for <tool_call>: ~3.5 s
    assert "".join(s.get("content") or "" for s in sent) == text
