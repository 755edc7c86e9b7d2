"""``n`` choices of one response run on one adapter version: the engine pins the version current
when a choice is queued, and a prompt's other choices are queued after its choice 0's first delta
(serving/http_api/choices.py), so a hot swap in between would mix two versions under one
``X-Adapter-Version`` / ``system_fingerprint``; the request is aborted instead. Reference: fake
engine streams whose versions are set by hand."""

from __future__ import annotations

import asyncio

import pytest

from nlora_serve.engine.api import RequestAborted, RequestOutput
from nlora_serve.serving.http_api.choices import start_choices


def _run(versions: dict[int, int], n: int, num_prompts: int = 1) -> list[tuple[int, int]]:
    """Drain start_choices over fake streams (``versions``: choice index -> the adapter version it is
    pinned to): (index, version) of each delta, in order; every stream is closed in the end."""
    opened: list = []

    def start(index: int):
        async def stream():
            try:
                for step in range(2):
                    await asyncio.sleep(0)
                    yield RequestOutput("r", "x", [5], "length" if step else None, 3, step + 1, adapter="lower",
                                        adapter_version=versions[index], adapter_hash=f"hash-{versions[index]}")
            finally:
                opened.remove(index)

        opened.append(index)
        return stream()

    async def drain():
        merged = await start_choices(start, n, num_prompts)
        try:
            return [(out.index, out.adapter_version) async for out in merged]
        finally:
            await merged.aclose()

    try:
        return asyncio.run(drain())
    finally:
        assert opened == []  # every choice's stream was closed (aborted if unfinished)


def test_choices_on_one_version_all_come_back():
    got = _run({0: 3, 1: 3, 2: 3}, n=3)
    assert sorted(got) == [(0, 3), (0, 3), (1, 3), (1, 3), (2, 3), (2, 3)]


@pytest.mark.parametrize("versions, n, num_prompts", [
    ({0: 3, 1: 4, 2: 4}, 3, 1),  # swapped to v4 after choice 0 was queued
    ({0: 3, 1: 3, 2: 3, 3: 4}, 2, 2),  # prompt 1's choice 1
])
def test_a_choice_pinned_to_another_version_aborts_the_request(versions, n, num_prompts):
    with pytest.raises(RequestAborted, match="changed from version 3 to 4"):
        _run(versions, n, num_prompts)
