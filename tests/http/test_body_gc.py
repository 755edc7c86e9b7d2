"""A large body's objects as the collector and the allocator see them (http_api/body_gc.py): no
full collection walks it while it is parsed and read, the collector's setting comes back whatever
happens, and it is freed in pieces, what something else holds left whole."""

from __future__ import annotations

import asyncio
import gc
import json
import threading

import pytest

from nlora_serve.serving.http_api import body_gc
from nlora_serve.serving.http_api.body import PIECES_CHARS, read_off_loop
from nlora_serve.serving.http_api.body_gc import full_collections_held, let_go
from nlora_serve.serving.http_api.request_models import ParamError


def _full_collections(work):
    """(what ``work()`` returned or raised, full collections run meanwhile): the start-up heap
    frozen first, as serve does (then a full pass comes after a quarter of it is made anew)."""
    full = []

    def seen(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(1)
    gc.collect()
    gc.freeze()
    gc.collect()  # the collector's count of long-lived objects now says few: a full pass comes soon
    gc.callbacks.append(seen)
    try:
        try:
            return work(), len(full)
        except Exception as exc:
            return exc, len(full)
    finally:
        gc.callbacks.remove(seen)
        gc.unfreeze()


def test_a_body_of_many_small_lists_is_parsed_and_read_with_no_full_collection():
    """100,000 one-id prompts (500 KB): full collections over them before (in a server, 7-13 of up
    to 0.15-0.6 s each for 3M), none now; the refusal's body freed before they resume."""
    raw = json.dumps({"model": "m", "prompt": [[1]] * 100_000}).encode()
    lens = []

    def refuse(data):
        lens.append(len(data["prompt"]))
        raise ParamError("too many prompts", "prompt")

    def read():
        return asyncio.run(read_off_loop(raw, None, lambda data: None, refuse))
    before = gc.get_threshold()
    outcome, full = _full_collections(read)
    assert isinstance(outcome, ParamError) and lens == [100_000]
    assert full == 0
    assert gc.get_threshold() == before
    # the reference: the same body parsed and kept as long, no hold
    from nlora_serve.serving.http_api.body import parsed_json
    _, full = _full_collections(lambda: parsed_json(raw, None))
    assert full > 0


def test_the_threshold_comes_back_after_holders_overlap_and_fail():
    before = gc.get_threshold()
    entered, leave = threading.Event(), threading.Event()

    def hold():
        with full_collections_held():
            entered.set()
            leave.wait(10)
    other = threading.Thread(target=hold)
    other.start()
    entered.wait(10)
    with pytest.raises(ValueError):
        with full_collections_held():
            assert gc.get_threshold()[2] == body_gc.HELD
            raise ValueError("a refusal")
    assert gc.get_threshold()[2] == body_gc.HELD  # the other holder is still in
    leave.set()
    other.join(10)
    assert gc.get_threshold() == before
    with full_collections_held(False):
        assert gc.get_threshold() == before


class _Watched:
    """``sys`` for body_gc, its getrefcount not counting the test's own reference to a watched list
    (the test sees it emptied, as no one would)."""

    def __init__(self, *watched):
        self.ids = {id(x) for x in watched}

    def getrefcount(self, x):
        import sys
        return sys.getrefcount(x) - 1 - (id(x) in self.ids)  # this frame's ``x``; the watcher's

    getsizeof = staticmethod(__import__("sys").getsizeof)


def test_let_go_frees_what_only_the_body_holds_and_leaves_the_rest(monkeypatch):
    monkeypatch.setattr(body_gc, "FREE", 3)
    monkeypatch.setattr(body_gc, "BIG", 100)
    prompt, big, shared, kept = [[1]] * 10, list(range(500)), [[1], [2]] * 10, {"k": [1]}
    monkeypatch.setattr(body_gc, "sys", _Watched(prompt, big))
    let_go([{"prompt": prompt, "big": big, "lists": ["x" * 5000, [shared]], "shared": shared, "kept": kept}])
    assert prompt == [] and big == []  # in pieces, the large ones each on its own
    assert shared == [[1], [2]] * 10 and kept == {"k": [1]}  # held elsewhere: left whole


def test_a_refused_large_body_leaves_no_reference_behind(monkeypatch):
    """The refusal's traceback keeps its lines, not the body (read's frame cleared of it), so the
    body is freed in its thread, in pieces."""
    raw = json.dumps({"model": "m", "prompt": [[1]] * (PIECES_CHARS // 4)}).encode()
    seen = []

    def refuse(data):
        prompt = data["prompt"]
        seen.append(prompt)
        monkeypatch.setattr(body_gc, "sys", _Watched(prompt))
        raise ParamError("too many prompts", "prompt")
    with pytest.raises(ParamError) as err:
        asyncio.run(read_off_loop(raw, None, lambda data: None, refuse))
    assert err.value.__traceback__ is not None
    assert seen[0] == []  # held by nothing but ``seen`` once read's frame let go
