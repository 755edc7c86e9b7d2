"""A large HTTP body is parsed and validated in pieces (body_json.py, body_pieces.py) so that the
GIL, which json.loads and pydantic-core hold for a whole call, is free between them: the value, and
the error of a bad body, are those of one ``json.loads`` / one ``model_validate`` (the references
here), and no single call gets the whole of a long list."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from nlora_serve.serving.http_api import body_json, body_pieces
from nlora_serve.serving.http_api.body_json import loads_in_pieces
from nlora_serve.serving.http_api.body_pieces import PieceErrors, validate_in_pieces
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest
from nlora_serve.serving.http_api.tokenize import Detokenize, TokenizeChat


def _outcome(loads, text: str):
    try:
        return "ok", json.dumps(loads(text))
    except json.JSONDecodeError as exc:
        return "error", exc.msg, exc.pos
    except RecursionError:
        return "too deep"


def _document(rng: random.Random, depth: int = 0):
    scalars = [0, -1, 12, 1.5, -2e10, True, False, None, "", "a", "x y", "é😀", 'q"uote', "tab\t", "[]{},:"]
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice(scalars)
    if roll < 0.6:
        return [_document(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 40]))]
    if roll < 0.8:
        return {f"k{i}": rng.choice(scalars) for i in range(rng.choice([0, 1, 3]))}
    return {rng.choice(["a", "messages", "prompt"]): _document(rng, depth + 1) for _ in range(2)}


def test_json_in_pieces_is_json_loads_value_and_error():
    rng = random.Random(7)
    marks = list('[]{},:" \n0123456789-.eEtrufalsn\\') + ['"a"', "1,", '{"a":1}', "\x01", "NaN"]
    for _ in range(1500):
        text = json.dumps(_document(rng), indent=rng.choice([None, 1]))
        for _ in range(rng.choice([0, 1, 2])):  # a mark inserted, a character cut, or the text cut short
            at, roll = rng.randrange(len(text) + 1), rng.random()
            text = (text[:at] + rng.choice(marks) + text[at:] if roll < 0.5 else
                    text[:at] + text[at + 1:] if roll < 0.8 else text[:at])
        assert _outcome(loads_in_pieces, text) == _outcome(json.loads, text), text
    for text in ["\ufeff{}", "[" * 100_000 + "]" * 100_000, "[" * 700 + "]" * 700, " [1, 2] x"]:
        assert _outcome(loads_in_pieces, text) == _outcome(json.loads, text)
    # objects of many flat pairs (parsed in runs), a key sent twice, each broken at random places
    for text in [json.dumps({**{f"k{i}": i for i in range(100)}, "n": {"a": [1, {"b": 2}]}, "k3": "v"}),
                 '{"a": 1, "b": 2, "a": 3, "c": [1], "b": 5}', '{"a":1 ,"b" :2 , "c": {"d":[]}}']:
        assert _outcome(loads_in_pieces, text) == _outcome(json.loads, text)
        for _ in range(400):
            at = rng.randrange(len(text))
            broken = text[:at] + rng.choice(["", "x", ",", '"', ":", " ", "}", "{", "1"]) + text[at + 1:]
            assert _outcome(loads_in_pieces, broken) == _outcome(json.loads, broken), broken


def test_json_in_pieces_gives_the_c_scanner_no_long_list_at_once(monkeypatch):
    calls = []
    scan = body_json._scan_c
    monkeypatch.setattr(body_json, "_scan_c", lambda s, i: calls.append(i) or scan(s, i))
    loads = json.loads
    monkeypatch.setattr(body_json.json, "loads", lambda text: calls.append(text) or loads(text))
    body = {"messages": [{"role": "user", "content": "a"}] * 5000, "prompt": [list(range(3000))] * 3,
            "tokens": [7] * 5000, "texts": ["a\\b"] * 5000, "logit_bias": {str(i): 1.5 for i in range(5000)}}
    text = json.dumps(body)
    assert loads_in_pieces(text) == body
    runs = [len(loads(c)) - (c[0] == "[") for c in calls if isinstance(c, str)]
    assert runs and max(runs) <= body_json.RUN
    assert sum(runs) == 5000 + 9000 + 5000 - 5 + 5000 - 1  # each list but its last item, the object but its last pair
    assert len(calls) > 60 and all(not isinstance(c, str) or len(c) < 64 << 10 for c in calls)


def _deep(rng: random.Random, levels: int) -> str:
    """JSON text ``levels`` arrays and objects deep, each level one of a few shapes (flat items and
    pairs around it, parsed in runs), the innermost a flat object, a run of them, or a scalar."""
    opens, closes = [], []
    for _ in range(levels):
        shape = rng.choice(["[", "[1, ", '[{"a": 1}, {"b": [] }, ', '{"k": ', '{"a": 1, "b": "x", "k": '])
        opens.append(shape)
        closes.append("]" if shape[0] == "[" else "}")
    inner = rng.choice(['{"a": 1}', "[]", "{}", "7", '[{"a": 1}, {"a": 2}, 3]', '[1, 2, 3, 4]', '[[1], [2, "a"], 3]'])
    return "".join(opens) + inner + "".join(reversed(closes))


def test_json_in_pieces_of_any_depth_is_json_loads():
    """Nested past the walk's old recursion (~500 levels, then one json.loads of all the body) and
    past json.loads' own limit (~990 levels, its RecursionError): the outcome is json.loads' called
    in the same place, broken texts included."""
    def parses(levels):
        return _outcome(json.loads, "[" * levels + "]" * levels) != "too deep"
    limit = next(n for n in range(2, 5000) if not parses(n)) - 1  # json.loads' levels here
    rng, outcomes = random.Random(11), set()
    for _ in range(100):
        text = _deep(rng, rng.choice([body_json.SHALLOW - 1, body_json.SHALLOW, limit - 2, limit - 1, limit,
                                      limit + 1, limit + 2, rng.randrange(limit - 5)]))
        if rng.random() < 0.5:
            at = rng.randrange(len(text))
            text = text[:at] + rng.choice(["", "x", ",", '"', "]", "}", "[", "{"]) + text[at + 1:]
        outcome = _outcome(loads_in_pieces, text)
        assert outcome == _outcome(json.loads, text), text
        outcomes.add(outcome if outcome == "too deep" else outcome[0])
    assert outcomes == {"ok", "error", "too deep"}


def test_a_deep_large_body_is_parsed_in_pieces(monkeypatch):
    """A body over 64 KiB with a value 900 levels deep: in pieces (it was one json.loads of all of it,
    the GIL held ~0.2 s at 16 MiB); deeper than json.loads goes, a 400 that says how deep it goes."""
    from fastapi.exceptions import RequestValidationError

    from nlora_serve.serving.http_api.body import parsed_json

    whole = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, **kw: whole.append(len(text)) or loads(text, **kw))
    body = '{"messages": %s, "deep": %s}' % (json.dumps([{"role": "user", "content": "hi"}] * 3000),
                                             "[" * 900 + "1" + "]" * 900)
    assert parsed_json(body.encode(), None) == loads(body)
    assert whole and max(whole) < 64 << 10
    too_deep = body.replace("[" * 900 + "1" + "]" * 900, "[" * 5000 + "]" * 5000)
    with pytest.raises(RequestValidationError) as err:
        parsed_json(too_deep.encode(), None)
    message = err.value.errors()[0]["msg"]
    assert message.startswith("JSON nested deeper than 9") and message.endswith("levels of arrays and objects, "
                                                                                 "the parser's limit"), message


def _outcomes(kind, data):
    """(reference: one model_validate; in pieces) as comparable values."""
    def run(validate):
        try:
            return "ok", validate(kind, data)
        except ValidationError as exc:
            return "error", exc.errors(include_url=False)
        except PieceErrors as exc:
            return "error", exc.errors
    return run(lambda k, d: k.model_validate(d)), run(validate_in_pieces)


MESSAGES = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            {"role": 5, "content": "a"}, {"role": "user", "content": 3}, {"role": "user", "extra": 1}, "text",
            {"role": "user", "content": [{"type": "text", "text": "x"}]}, {"role": "user", "content": [5]}, {}]


@pytest.mark.parametrize("kind", [ChatRequest, TokenizeChat])
def test_messages_in_pieces_are_one_validation(monkeypatch, kind):
    monkeypatch.setattr(body_pieces, "PIECE", 3)
    rng, kinds = random.Random(3), set()
    for _ in range(150):
        data = {"model": rng.choice(["m", 5]), "messages": [rng.choice(MESSAGES[:2] * 6 + MESSAGES)
                                                             for _ in range(rng.choice([2, 7, 20]))]}
        if rng.random() < 0.5:
            data[rng.choice(["max_tokens", "tools", "documents", "add_generation_prompt"])] = rng.choice(
                [1, "x", [{"type": "function", "function": {"name": "f"}}] * 5, [{"a": "b"}] * 4 + [{"a": 1}], None])
        reference, pieces = _outcomes(kind, data)
        assert reference == pieces, data
        kinds.add(reference[0] if reference[0] == "ok" else len(reference[1]) > 1)
    assert kinds == {"ok", True, False}  # valid bodies, one error, several


def test_prompts_in_pieces_are_one_validation(monkeypatch):
    monkeypatch.setattr(body_pieces, "PIECE", 3)
    validations = []
    validate = CompletionRequest.model_validate
    monkeypatch.setattr(CompletionRequest, "model_validate", lambda d: validations.append(d) or validate(d))
    prompts = [[1, 2, 3] * 5, [[1, 2]] * 9, ["ab"] * 9, [2 ** 70, 1], [[1], []], [[1], ["a"]], [1, True], ["a", 1],
               [[1, 2.5]], "text", [], 5]
    for prompt in prompts:
        for extra in ({}, {"max_tokens": "5", "stop_token_ids": [1, 2, 3, "x", 5]}, {"stop_token_ids": list(range(9))}):
            data = {"model": "m", "prompt": prompt, **extra}
            validations.clear()
            reference, pieces = _outcomes(CompletionRequest, data)
            assert reference == pieces, data
    good = {"model": "m", "prompt": [list(range(1000))] * 4}
    validations.clear()
    assert validate_in_pieces(CompletionRequest, good).prompt is good["prompt"]
    assert all(len(json.dumps(d["prompt"])) < 20 for d in validations)  # pydantic never gets the 4,000 ids


def test_a_long_list_reaches_pydantic_a_piece_at_a_time(monkeypatch):
    monkeypatch.setattr(body_pieces, "PIECE", 4)
    seen = []
    real = body_pieces._adapter

    def adapter(kind, name):
        inner = real(kind, name)
        return type("Spy", (), {"validate_python": lambda self, v: seen.append(len(v)) or inner.validate_python(v)})()
    monkeypatch.setattr(body_pieces, "_adapter", adapter)
    data = {"model": "m", "tokens": list(range(10))}
    assert validate_in_pieces(Detokenize, data) == Detokenize.model_validate(data)
    assert seen == [4, 4, 2]


def test_a_large_body_is_parsed_off_the_event_loop():
    import asyncio
    import threading

    from nlora_serve.serving.http_api.body import PIECES_CHARS, off_loop
    small, large = (asyncio.run(off_loop(size, lambda: threading.current_thread().name))
                    for size in (PIECES_CHARS, PIECES_CHARS + 1))
    assert small == threading.current_thread().name
    # on the body threads, not asyncio's default pool, which finishes tenants' whole responses (h125)
    assert large.startswith("nlora-body"), large


def test_lone_surrogates_are_found_a_piece_at_a_time(monkeypatch):
    from nlora_serve.serving.http_api import body

    monkeypatch.setattr(body.json, "dumps", None)  # json.dumps of the whole body held the GIL ~0.6 s for 2.6M ids
    lone = [{"a": ["x", [["\ud800"]]]}, {"\udc00": 1}, ["ok"] * 10_000 + ["\ud83d"], "\ud800", {"k": {"k": "\udfff"}}]
    fine = [{"a": ["x", [["😀"]]]}, {"é": 1}, ["ok"] * 10_000 + [1, None, 2.5], "", {"k": {"k": "日本"}}, ["\ud83d\ude00"]]
    assert [body._is_unicode(d) for d in lone] == [False] * len(lone)
    assert [body._is_unicode(d) for d in fine] == [True] * (len(fine) - 1) + [False]  # two halves, no pair: lone


def test_a_large_body_with_a_long_integer_is_parsed_again_in_pieces(monkeypatch):
    """An integer past Python's digit limit makes the body parse again, keeping it as text: in pieces
    too (json.loads of the whole 16 MiB body held the GIL ~0.2 s, loop lag 22 -> 191 ms)."""
    from fastapi.exceptions import RequestValidationError

    from nlora_serve.serving.http_api.body import parsed_json

    whole = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, **kw: whole.append(len(text)) or loads(text, **kw))
    body = {"messages": [{"role": "user", "content": "hi"}] * 3000, "stop_token_ids": [1, 2]}
    raw = json.dumps(body).replace("[1, 2]", "[1, " + "7" * 4301 + "]").encode()
    with pytest.raises(RequestValidationError) as err:
        parsed_json(raw, None)
    assert err.value.errors()[0]["msg"] == "stop_token_ids[1] = 77777777... (4301 digits) is out of range"
    assert whole and max(whole) < 64 << 10
    assert parsed_json(json.dumps(body).encode(), None) == body


@pytest.mark.parametrize("raw, message", [(b"[1, " + b"7" * 4301 + b"]", "body[1] = 77777777... (4301 digits) is out of range"),
                                          (b"-" + b"7" * 4301, "-77777777... (4301 digits) is out of range")])
def test_a_long_integer_in_a_body_that_is_no_object_is_refused(raw, message):
    """Such a body kept the integer as a _LongInt, and its refusal ("expected a JSON object") failed
    in json.dumps of it: a 500 with a trace."""
    from fastapi.exceptions import RequestValidationError

    from nlora_serve.serving.http_api.body import parsed_json

    with pytest.raises(RequestValidationError) as err:
        parsed_json(raw, None)
    assert err.value.errors() == [{"type": "value_error", "loc": ("body",), "input": {}, "msg": message}]


def test_a_list_field_a_validator_reads_is_validated_whole():
    # a validator of a list field (or of the whole model) would see the [] put in its place while the
    # list is validated in pieces: such fields are left whole (none of the request models has one today)
    from pydantic import BaseModel, field_validator, model_validator

    from nlora_serve.serving.http_api.body_pieces import PIECE, validate_in_pieces

    class Checked(BaseModel):
        ids: list[int]

        @field_validator("ids")
        @classmethod
        def _not_empty(cls, value):
            assert value, "ids is empty"
            return value

    class Whole(BaseModel):
        ids: list[int]

        @model_validator(mode="after")
        def _not_empty(self):
            assert self.ids, "ids is empty"
            return self

    data = {"ids": list(range(PIECE + 1))}
    for kind in (Checked, Whole):
        assert validate_in_pieces(kind, data).ids == data["ids"]
