"""body.without_union_labels is linear in the errors: it compared every error with every other, so
1,000 chat messages of a bad content (35 KB, under max_model_len messages) held the event loop
4.5 s and 4,000 held it 38 s. Its output is the quadratic version's (the reference, copied here)."""

from __future__ import annotations

import random

from pydantic import ValidationError

from nlora_serve.serving.http_api.body import _MAX_BRANCHES_SHOWN, _walk, without_union_labels
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest


def _reference(errors: list[dict], data) -> list[dict]:
    walked = [_walk(e.get("loc", ()), data, e.get("type") == "missing") for e in errors]
    out = []
    for error, (where, labels) in zip(errors, walked):
        if not labels:
            out.append(error)
            continue
        at, label = labels[0]
        loc = tuple(error["loc"])
        seen, alternatives = {label}, []
        for other, (other_where, other_labels) in zip(errors, walked):
            if (not other_labels or other_labels[0][0] != at or tuple(other["loc"])[:at] != loc[:at]
                    or other_labels[0][1] in seen or len(seen) > _MAX_BRANCHES_SHOWN):
                continue
            seen.add(other_labels[0][1])
            inside = f"at {'.'.join(map(str, other_where))}: " if other_where != where else ""
            alternatives.append(f"as {other_labels[0][1]}: {inside}{other.get('msg')}")
        msg = f"{error.get('msg')} (as {label})" + "".join(f"; or {a}" for a in alternatives)
        out.append({**error, "loc": where, "msg": msg})
    return out


def _errors(kind, data) -> list[dict]:
    try:
        kind.model_validate(data)
    except ValidationError as exc:
        return exc.errors(include_url=False)
    return []


CONTENTS = ["a", 5, None, [{"type": "text", "text": "x"}], [5], [{"type": 5}], {"a": 1}, True]


def test_the_labels_are_the_quadratic_versions():
    rng, with_labels = random.Random(5), 0
    for _ in range(200):
        data = {"model": rng.choice(["m", 1]), "messages": [{"role": "user", "content": rng.choice(CONTENTS)}
                                                             for _ in range(rng.choice([1, 3, 8]))],
                "stop": rng.choice([None, "x", 5, ["a", 5], [[1]]]), "tool_choice": rng.choice([None, "auto", 5, [1]])}
        errors = _errors(ChatRequest, data)
        assert without_union_labels(errors, data) == _reference(errors, data)
        with_labels += any(_walk(e["loc"], data, False)[1] for e in errors)
    data = {"model": "m", "prompt": [1, "a", [2]] * 5}
    errors = _errors(CompletionRequest, data)
    assert without_union_labels(errors, data) == _reference(errors, data)
    assert with_labels > 100


class _Counted(dict):
    reads = 0

    def __getitem__(self, key):
        _Counted.reads += 1
        return super().__getitem__(key)


def test_each_error_is_looked_at_a_bounded_number_of_times():
    data = {"model": "m", "messages": [{"role": "user", "content": 5}] * 2000}
    errors = [_Counted(e) for e in _errors(ChatRequest, data)]
    assert len(errors) == 4000  # each message: not a string, nor a list of parts
    _Counted.reads = 0
    out = without_union_labels(errors, data)
    assert out[0]["loc"] == ("messages", 0, "content") and "; or as list[ContentPart]" in out[0]["msg"]
    assert _Counted.reads <= 4 * len(errors)  # the quadratic version read 16,000,000 times
