"""Record vLLM 0.32's hermes and llama3_json tool-call parsers on fixed texts into
tests/data/vllm_tool_parsers.json (test_http_auto_tools.py compares http_api/tool_parsers.py with it).

Runs only in the vLLM virtual environment, once, by hand (no model, no GPU):
    .venv-vllm/bin/python tests/http/vllm_tool_parsers.py

Per case: the whole answer's (calls as [name, arguments], content) as vLLM's chat serving writes
it (parser/abstract_parser.py: content of only whitespace beside calls is None), and the streamed
deltas (``extract_tool_calls_streaming`` fed the text in the case's pieces, each DeltaMessage as
the chunk's ``delta`` serializes it, None for no chunk; call ids replaced by "ID"; the last one
with the arguments parsed but not streamed, as vLLM's serving layer finishes a stream).
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
from vllm.tool_parsers.llama_tool_parser import Llama3JsonToolParser

OUT = Path(__file__).resolve().parents[1] / "data" / "vllm_tool_parsers.json"

CASES = [  # (parser, pieces of the model's text)
    ("hermes", ["I will ", "check.\n<tool", "_call>\n{\"name\": \"get_", "weather\", \"arguments\": {\"city\": ",
                "\"Paris\", \"unit\": ", "\"celsius\"}}\n</tool_call>"]),
    ("hermes", ["<tool_call>", "{\"name\": \"a\", \"arguments\": {\"x\": [1, ", "2]}}", "</tool_call>\n<tool_call>",
                "{\"name\": \"b\", \"arguments\": {}}", "</tool_call>"]),
    ("hermes", ["<tool_call>{\"name\": \"a\", \"arguments\": {\"q\": \"é\"}}"]),  # no closing tag
    ("hermes", ["Just text, ", "no calls."]),
    ("hermes", ["<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1}", "</tool_call>"]),  # bad JSON
    ("hermes", ["<tool_call>{\"name\": \"a\"}</tool_call>"]),  # no arguments key
    ("hermes", ["  \n", "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>"]),
    ("llama3_json", ["<|python_tag|>", "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Par", "is\"}}"]),
    ("llama3_json", ["{\"name\": \"a\", ", "\"arguments\": {\"n\": 1}}", "; {\"name\": \"b\", \"parameters\": ",
                     "{\"l\": [1, 2]}}"]),
    ("llama3_json", ["The answer ", "is 4."]),
    ("llama3_json", ["{\"answer\": 4}"]),  # JSON, not a call
    ("llama3_json", ["Sure: ", "{\"name\": \"a\", \"parameters\": {}}"]),  # a call after text
    # streamed and whole answers that differed (tests/http/test_tool_stream_whole.py)
    ("hermes", ["<tool_call>{\"name\": \"a\"", "}</tool_call>"]),  # no arguments, streamed
    ("hermes", ["<tool_call>{\"name\": \"a\", \"arguments\": {}}}</tool_call>"]),  # bad JSON, one delta
    ("hermes", ["<tool_call>{\"name\": \"a\", \"arguments\": {}} x"]),  # unclosed, text after the JSON
    ("llama3_json", ["{\"name\": \"a\"", " }"]),  # no arguments, streamed
    ("llama3_json", ["{\"name\": \"a\", \"parameters\": {}}}", "; {\"name\": \"b\", \"parameters\": {}}"]),
    ("llama3_json", ["{\"name\": \"a\", \"parameters\": {}]"]),  # bad JSON, one delta
    # ... that still differ: the stream cannot know in time (as vLLM's)
    ("hermes", ["<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1", "}}}</tool_call>"]),
    ("hermes", ["<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>", "<tool_call>{\"name\": \"b\"}</tool_call>"]),
    ("hermes", ["<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1}, ", "\"arguments\": {\"y\": 2}}</tool_call>"]),
]


class _Tokenizer:
    """What the two parsers read of a tokenizer: its vocabulary (llama3_json needs <|python_tag|>)."""

    def get_vocab(self) -> dict[str, int]:
        return {"<|python_tag|>": 128010, "<tool_call>": 151657, "</tool_call>": 151658}


def _parser(name: str):
    return (Hermes2ProToolParser if name == "hermes" else Llama3JsonToolParser)(_Tokenizer())


def _delta(message, parser=None) -> dict | None:
    """The chunk's delta; ``parser`` on the finishing one: the arguments parsed but not streamed go
    on its last call (the serving layer's ``_append_unstreamed_tool_args``)."""
    if message is None:
        return None
    if parser is not None and message.tool_calls and message.tool_calls[-1].function:
        last = message.tool_calls[-1].function
        last.arguments = (last.arguments or "") + parser.get_remaining_unstreamed_args()
    delta = json.loads(message.model_dump_json(exclude_unset=True))
    for call in delta.get("tool_calls", []):
        if "id" in call:
            call["id"] = "ID"
    return delta


def record() -> list[dict]:
    cases = []
    for name, pieces in CASES:
        text = "".join(pieces)
        info = _parser(name).extract_tool_calls(text, None)
        content = info.content
        if info.tools_called and content is not None and not content.strip():
            content = None
        parser, previous, deltas = _parser(name), "", []
        for i, piece in enumerate(pieces):
            current = previous + piece
            message = parser.extract_tool_calls_streaming(previous, current, piece, [], [], [], None)
            deltas.append(_delta(message, parser if i == len(pieces) - 1 else None))
            previous = current
        cases.append({"parser": name, "pieces": pieces,
                      "calls": [[c.function.name, c.function.arguments] for c in info.tool_calls] if info.tools_called
                      else [], "content": content, "deltas": deltas})
    return cases


if __name__ == "__main__":
    OUT.write_text(json.dumps(record(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")
