"""The vLLM backend's fold-folder bound under load (runs in CI, no vllm): at most ``max_folders``
fold folders on disk, in use or idle; a request whose version needs one more waits, first come
first served, while the least recently used busy folders drain for it.

References: the folder tree on disk sampled at every turn of the event loop, each request's outcome.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

import fold_cache_harness
from fold_cache_harness import FakeVllm, folders, residency_of, versions_of
from nlora_serve.engine.vllm_backend.fold_cache import FoldCache

tied = fold_cache_harness.tied  # the fixture: the tied case adapter, once per module


def _watch(root: Path, seen: list[int]):
    """A task that records how many fold folders are on disk at every turn of the loop."""
    async def watch():
        while True:
            seen.append(len(folders(root)))
            await asyncio.sleep(0)
    return asyncio.create_task(watch())


def test_the_bound_holds_while_every_folder_is_in_use(base_fp32, tied, tmp_path):
    # it was exceeded: a version whose folder was missing was folded at once, one folder more per
    # version in flight beyond the bound (a tmpfs's memory, in containers)
    residency = residency_of(base_fp32, tmp_path)
    a, b = versions_of(residency, tied, 2)
    vllm, seen = FakeVllm(tmp_path), []

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        watch = _watch(tmp_path, seen)
        await cache.use(a)
        second = asyncio.create_task(cache.use(b))  # a's request runs: b waits for room
        await asyncio.sleep(0.1)
        assert not second.done() and cache.waiting == 1 and folders(tmp_path) == {a.slot}
        # a drains for b: a new request of a waits too, else a busy a kept b waiting for ever
        third = asyncio.create_task(cache.use(a))
        await asyncio.sleep(0.05)
        assert not third.done() and cache.waiting == 2 and vllm.removed == []
        cache.done(a.slot)  # a's request ends: a goes, then b (which waited first) is folded
        await asyncio.wait_for(second, 5)
        assert folders(tmp_path) == {b.slot} and vllm.removed == [(a.slot, True)] and not third.done()
        cache.done(b.slot)  # b drained for a meanwhile: it goes, a is folded again
        await asyncio.wait_for(third, 5)
        watch.cancel()
        return cache
    cache = asyncio.run(go())
    assert folders(tmp_path) == {a.slot} and vllm.removed == [(a.slot, True), (b.slot, True)]
    assert (cache.waiting, cache.users(a.slot), cache.users(b.slot), max(seen)) == (0, 1, 0, 1)


def test_a_busy_folder_cannot_keep_a_waiting_request_out(base_fp32, tied, tmp_path):
    """Requests of a keep arriving, each overlapping the last, under a bound of 1: b's request gets
    its folder once the requests a had when b came have ended (it waited for ever: a was never
    idle). Reference: the order the requests ran in."""
    residency = residency_of(base_fp32, tmp_path)
    a, b = versions_of(residency, tied, 2)
    order = []

    async def request(cache, version, seconds):
        await cache.use(version)
        order.append(version.slot)
        await asyncio.sleep(seconds)
        cache.done(version.slot)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=FakeVllm(tmp_path).remove)
        busy = [asyncio.create_task(request(cache, a, 0.05))]
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(request(cache, b, 0.0))
        for _ in range(20):  # a's next request always starts before its last one ends
            await asyncio.sleep(0.02)
            busy.append(asyncio.create_task(request(cache, a, 0.05)))
        await asyncio.wait_for(asyncio.gather(waiter, *busy), 30)
    asyncio.run(go())
    assert order[:2] == [a.slot, b.slot] and order.count(a.slot) == 21


def test_a_request_cancelled_while_it_waits_for_room_takes_none(base_fp32, tied, tmp_path):
    residency = residency_of(base_fp32, tmp_path)
    a, b, c = versions_of(residency, tied, 3)
    vllm = FakeVllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        await cache.use(a)
        waiter = asyncio.create_task(cache.use(b))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert cache.waiting == 0
        cache.done(a.slot)  # idle, and nobody waits: it stays
        await asyncio.sleep(0.05)
        assert folders(tmp_path) == {a.slot} and vllm.removed == []
        await cache.use(c)  # room made for c
        return cache
    cache = asyncio.run(go())
    assert folders(tmp_path) == {c.slot} and cache.users(b.slot) == 0


def test_a_fold_its_requests_left_is_removed_when_room_is_needed(base_fp32, tied, tmp_path):
    residency = residency_of(base_fp32, tmp_path)
    a, b = versions_of(residency, tied, 2)
    vllm = FakeVllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        first = asyncio.create_task(cache.use(a))
        await asyncio.sleep(0)
        first.cancel()  # a's fold goes on, with no request left to end it
        await asyncio.wait_for(cache.use(b), 10)  # waits for the fold, then its removal
    asyncio.run(go())
    assert folders(tmp_path) == {b.slot} and vllm.removed == [(a.slot, True)]


def test_swaps_racing_requests_never_exceed_the_bound(base_fp32, tied, tmp_path):
    """Four tenants, each hot-swapped 6 times while 24 requests of their current versions run for
    random times and 4 of each 24 are cancelled, under a bound of 2: every request that was not
    cancelled ran with its folder on disk, no more than 2 folders were ever on disk, and at the end only
    the idle ones within the bound remain. References: the folder tree sampled at every turn of
    the loop, each request's folder checked while it runs."""
    import random

    rng = random.Random(7)
    residency = residency_of(base_fp32, tmp_path)
    vllm, seen = FakeVllm(tmp_path), []
    current = {name: versions_of(residency, tied, 1)[0] for name in "wxyz"}
    ran, cancelled, pins, superseded, drops = [], [], Counter(), set(), []

    def release(cache, slot):
        """The registry's rule: a superseded version is freed when its last pin is released."""
        pins[slot] -= 1
        if pins[slot] == 0 and slot in superseded:
            drops.append(asyncio.ensure_future(cache.drop(slot)))

    async def request(cache, name):
        version = current[name]
        pins[version.slot] += 1  # pinned at admission, as the engine's add_request does
        try:
            await cache.use(version)
            try:
                assert (residency.path(version.slot) / "adapter_model.safetensors").is_file()
                await asyncio.sleep(rng.uniform(0, 0.03))
                assert (residency.path(version.slot) / "adapter_model.safetensors").is_file()
                ran.append(version.slot)
            finally:
                cache.done(version.slot)
        except asyncio.CancelledError:  # while it waited, folded or ran
            cancelled.append(version.slot)
            raise
        finally:
            release(cache, version.slot)

    async def swap(cache, name):
        await asyncio.sleep(rng.uniform(0, 0.05))
        old, current[name] = current[name], versions_of(residency, tied, 1)[0]
        superseded.add(old.slot)
        pins[old.slot] += 1  # the registry's own reference to its current version, dropped now
        release(cache, old.slot)

    async def go():
        cache = FoldCache(residency, max_folders=2, remove=vllm.remove)
        watch = _watch(tmp_path, seen)
        for _ in range(6):
            tasks = [asyncio.create_task(request(cache, rng.choice("wxyz"))) for _ in range(24)]
            swaps = [asyncio.create_task(swap(cache, name)) for name in "wxyz"]
            await asyncio.sleep(0.01)
            for task in rng.sample(tasks, 4):
                task.cancel()
            results = await asyncio.wait_for(asyncio.gather(*tasks, *swaps, return_exceptions=True), 60)
            assert not [r for r in results if isinstance(r, Exception)]  # a folder missing while it ran
        await asyncio.gather(*drops)
        watch.cancel()
        return cache
    cache = asyncio.run(go())
    assert max(seen) <= 2 and len(ran) + len(cancelled) == 6 * 24 and len(ran) >= 6 * 20 and cache.waiting == 0
    assert len(folders(tmp_path)) <= 2
