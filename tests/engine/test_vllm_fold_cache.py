"""The vLLM backend's fold folders on disk (runs in CI, no vllm): a version is folded on its first
request, not on registration, and at most ``max_folders`` folders are on disk, in use or idle.

References: the folder tree on disk, a count of the folds written, the order of vLLM's
``remove_lora`` against the folder's deletion (a folder vLLM may still read must not go).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nlora_serve.adapters.loader import read_adapter
from nlora_serve.engine.vllm_backend import fold_cache as fold_cache_module
from nlora_serve.engine.vllm_backend.adapters import VllmResidency
from nlora_serve.engine.vllm_backend.fold_cache import FoldCache
from nlora_serve.errors import AdapterError

CASES = Path(__file__).parents[1] / "data" / "cases"


@pytest.fixture(scope="module")
def tied(base_fp32):
    return read_adapter(CASES / "inttune-nystrom-tied", base_fp32)


def _residency(base_fp32, root: Path) -> VllmResidency:
    return VllmResidency(root, torch.float32, tuple(base_fp32.weight(0, "q_proj").shape))


def _versions(residency: VllmResidency, adapter, n: int) -> list:
    versions = [SimpleNamespace(adapter=adapter, pool=None, slot=None, held_bytes=0) for _ in range(n)]
    for v in versions:
        residency.admit(v)
    return versions


def _folders(root: Path) -> set[int]:
    return {int(p.name) for p in root.iterdir() if p.is_dir()}


class _Vllm:
    """vLLM's remove_lora as the cache sees it: records which folders still existed when called."""

    def __init__(self, root: Path):
        self.root, self.removed = root, []

    async def remove(self, lora_id: int, folder: Path) -> None:
        self.removed.append((lora_id, folder.is_dir()))  # remove_lora first: the folder is still there
        await asyncio.sleep(0.01)  # answered between vLLM's steps
        shutil.rmtree(folder, ignore_errors=True)


def _count_folds(monkeypatch) -> list[int]:
    written = []
    real = fold_cache_module.write_folded_lora

    def counted(adapter, out_dir):
        written.append(int(out_dir.name))
        return real(adapter, out_dir)
    monkeypatch.setattr(fold_cache_module, "write_folded_lora", counted)
    return written


def test_registering_writes_no_fold_folder_and_held_bytes_are_the_folded_ones(base_fp32, tied, tmp_path):
    residency = _residency(base_fp32, tmp_path)
    versions = _versions(residency, tied, 40)
    assert _folders(tmp_path) == set() and len({v.slot for v in versions}) == 40
    # what vLLM will hold for it: A [R, in] and B [out, R] per site at the largest rank, fp32 here
    rank = max(s.rank for s in tied.sites.values())
    assert versions[0].held_bytes == 4 * sum(rank * (s.A.shape[1] + s.B.shape[0]) for s in tied.sites.values())


def test_the_first_request_folds_once_however_many_arrive_together(base_fp32, tied, tmp_path, monkeypatch):
    written = _count_folds(monkeypatch)
    residency = _residency(base_fp32, tmp_path)
    versions = _versions(residency, tied, 3)
    vllm = _Vllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=2, remove=vllm.remove)
        await asyncio.gather(*(cache.use(versions[1]) for _ in range(4)))
        return cache
    cache = asyncio.run(go())
    assert written == [versions[1].slot] and _folders(tmp_path) == {versions[1].slot}
    assert (residency.path(versions[1].slot) / "adapter_model.safetensors").is_file()
    assert cache.users(versions[1].slot) == 4


def test_beyond_the_bound_idle_folders_go_after_vllm_drops_them_and_are_folded_again(
        base_fp32, tied, tmp_path, monkeypatch):
    written = _count_folds(monkeypatch)
    residency = _residency(base_fp32, tmp_path)
    a, b, c = _versions(residency, tied, 3)
    vllm = _Vllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=2, remove=vllm.remove)
        for v in (a, b):
            await cache.use(v)
            cache.done(v.slot)
        first = (residency.path(a.slot) / "adapter_model.safetensors").read_bytes()
        assert _folders(tmp_path) == {a.slot, b.slot} and vllm.removed == []
        await cache.use(c)  # a third folder: a, the least recently used idle one, goes
        cache.done(c.slot)
        await asyncio.sleep(0.05)
        assert _folders(tmp_path) == {b.slot, c.slot} and vllm.removed == [(a.slot, True)]
        await cache.use(a)  # folded again on demand, the same bytes; b (idle, oldest) goes
        await asyncio.sleep(0.05)
        assert _folders(tmp_path) == {a.slot, c.slot}
        return first == (residency.path(a.slot) / "adapter_model.safetensors").read_bytes()
    assert asyncio.run(go())
    assert written == [a.slot, b.slot, c.slot, a.slot]


def test_a_folder_is_never_removed_while_its_version_has_a_request_in_flight(base_fp32, tied, tmp_path):
    residency = _residency(base_fp32, tmp_path)
    a, b, c = _versions(residency, tied, 3)
    vllm = _Vllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=2, remove=vllm.remove)
        await cache.use(a)
        await cache.use(b)
        await cache.use(b)
        cache.done(b.slot)  # b still has a request in flight
        third = asyncio.create_task(cache.use(c))  # no room: a and b are in use, neither may go
        await asyncio.sleep(0.05)
        assert not third.done() and _folders(tmp_path) == {a.slot, b.slot} and vllm.removed == []
        cache.done(a.slot)  # a is idle now and the least recently used: it goes, c is folded
        await asyncio.wait_for(third, 5)
        assert _folders(tmp_path) == {b.slot, c.slot} and vllm.removed == [(a.slot, True)]
        cache.done(b.slot)  # idle, within the bound: kept
        await asyncio.sleep(0.05)
        assert _folders(tmp_path) == {b.slot, c.slot}
    asyncio.run(go())


def test_a_request_for_a_version_being_removed_waits_and_gets_a_fresh_fold(base_fp32, tied, tmp_path):
    residency = _residency(base_fp32, tmp_path)
    a, b = _versions(residency, tied, 2)
    vllm = _Vllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        await cache.use(a)
        cache.done(a.slot)
        await cache.use(b)
        cache.done(b.slot)  # a's removal is under way (remove_lora not answered yet)
        await cache.use(a)  # must not be handed a folder the removal then deletes
        assert (residency.path(a.slot) / "adapter_model.safetensors").is_file()
        await asyncio.sleep(0.05)
        assert (residency.path(a.slot) / "adapter_model.safetensors").is_file()
    asyncio.run(go())


def test_a_request_cancelled_while_its_version_folds_leaves_no_user(base_fp32, tied, tmp_path):
    residency = _residency(base_fp32, tmp_path)
    (a,) = _versions(residency, tied, 1)
    vllm = _Vllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        task = asyncio.create_task(cache.use(a))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cache.users(a.slot) == 0
        await cache.use(a)  # the fold went on and serves the next request
        return cache.users(a.slot)
    assert asyncio.run(go()) == 1


def test_a_fold_that_fails_fails_its_requests_and_the_next_one_tries_again(base_fp32, tied, tmp_path, monkeypatch):
    residency = _residency(base_fp32, tmp_path)
    (a,) = _versions(residency, tied, 1)
    real, calls = fold_cache_module.write_folded_lora, []

    def full_once(adapter, out_dir):
        calls.append(out_dir)
        if len(calls) == 1:
            raise AdapterError("cannot write the adapter folded for vLLM (No space left on device)")
        return real(adapter, out_dir)
    monkeypatch.setattr(fold_cache_module, "write_folded_lora", full_once)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=_Vllm(tmp_path).remove)
        with pytest.raises(AdapterError, match="No space left"):
            await cache.use(a)
        assert cache.users(a.slot) == 0
        await cache.use(a)
    asyncio.run(go())
    assert len(calls) == 2 and _folders(tmp_path) == {a.slot}


def test_a_freed_version_is_dropped_from_vllm_before_its_folder_goes(base_fp32, tied, tmp_path):
    residency = _residency(base_fp32, tmp_path)
    a, b = _versions(residency, tied, 2)
    vllm = _Vllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        await cache.use(a)
        cache.done(a.slot)
        await cache.drop(a.slot)  # freed: no request can ask for it again
        await cache.drop(b.slot)  # freed before any request folded it: vLLM is told all the same
        await cache.use(b)
        return cache.users(a.slot), _folders(tmp_path)
    assert asyncio.run(go()) == (0, {b.slot})
    assert vllm.removed == [(a.slot, True), (b.slot, False)]


def test_a_version_freed_while_it_folds_leaves_no_folder(base_fp32, tied, tmp_path, monkeypatch):
    # an unload --force during a version's first fold: its request is cancelled, the version freed
    # and its folder removed at once, and the fold, still running, then wrote it: a folder on disk
    # until shutdown that no bound counted
    residency = _residency(base_fp32, tmp_path)
    (a,) = _versions(residency, tied, 1)
    vllm, real = _Vllm(tmp_path), fold_cache_module.write_folded_lora

    def slow(adapter, out_dir):
        time.sleep(0.3)
        return real(adapter, out_dir)
    monkeypatch.setattr(fold_cache_module, "write_folded_lora", slow)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        request = asyncio.create_task(cache.use(a))
        await asyncio.sleep(0.05)
        request.cancel()  # the forced unload aborts it while it folds
        await asyncio.gather(request, return_exceptions=True)
        await cache.drop(a.slot)  # its last pin released: the version is freed
        await asyncio.sleep(0.5)
    asyncio.run(go())
    assert _folders(tmp_path) == set() and vllm.removed == [(a.slot, True)]


def _watch(root: Path, seen: list[int]):
    """A task that records how many fold folders are on disk at every turn of the loop."""
    async def watch():
        while True:
            seen.append(len(_folders(root)))
            await asyncio.sleep(0)
    return asyncio.create_task(watch())


def test_the_bound_holds_while_every_folder_is_in_use(base_fp32, tied, tmp_path):
    # it was exceeded: a version whose folder was missing was folded at once, one folder more per
    # version in flight beyond the bound (a tmpfs's memory, in containers)
    residency = _residency(base_fp32, tmp_path)
    a, b = _versions(residency, tied, 2)
    vllm, seen = _Vllm(tmp_path), []

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        watch = _watch(tmp_path, seen)
        await cache.use(a)
        second = asyncio.create_task(cache.use(b))  # a's request runs: b waits for room
        await asyncio.sleep(0.1)
        assert not second.done() and cache.waiting == 1 and _folders(tmp_path) == {a.slot}
        # a drains for b: a new request of a waits too, else a busy a kept b waiting for ever
        third = asyncio.create_task(cache.use(a))
        await asyncio.sleep(0.05)
        assert not third.done() and cache.waiting == 2 and vllm.removed == []
        cache.done(a.slot)  # a's request ends: a goes, then b (which waited first) is folded
        await asyncio.wait_for(second, 5)
        assert _folders(tmp_path) == {b.slot} and vllm.removed == [(a.slot, True)] and not third.done()
        cache.done(b.slot)  # b drained for a meanwhile: it goes, a is folded again
        await asyncio.wait_for(third, 5)
        watch.cancel()
        return cache
    cache = asyncio.run(go())
    assert _folders(tmp_path) == {a.slot} and vllm.removed == [(a.slot, True), (b.slot, True)]
    assert (cache.waiting, cache.users(a.slot), cache.users(b.slot), max(seen)) == (0, 1, 0, 1)


def test_a_busy_folder_cannot_keep_a_waiting_request_out(base_fp32, tied, tmp_path):
    """Requests of a keep arriving, each overlapping the last, under a bound of 1: b's request gets
    its folder once the requests a had when b came have ended (it waited for ever: a was never
    idle). Reference: the order the requests ran in."""
    residency = _residency(base_fp32, tmp_path)
    a, b = _versions(residency, tied, 2)
    order = []

    async def request(cache, version, seconds):
        await cache.use(version)
        order.append(version.slot)
        await asyncio.sleep(seconds)
        cache.done(version.slot)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=_Vllm(tmp_path).remove)
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
    residency = _residency(base_fp32, tmp_path)
    a, b, c = _versions(residency, tied, 3)
    vllm = _Vllm(tmp_path)

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
        assert _folders(tmp_path) == {a.slot} and vllm.removed == []
        await cache.use(c)  # room made for c
        return cache
    cache = asyncio.run(go())
    assert _folders(tmp_path) == {c.slot} and cache.users(b.slot) == 0


def test_a_fold_its_requests_left_is_removed_when_room_is_needed(base_fp32, tied, tmp_path):
    residency = _residency(base_fp32, tmp_path)
    a, b = _versions(residency, tied, 2)
    vllm = _Vllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        first = asyncio.create_task(cache.use(a))
        await asyncio.sleep(0)
        first.cancel()  # a's fold goes on, with no request left to end it
        await asyncio.wait_for(cache.use(b), 10)  # waits for the fold, then its removal
    asyncio.run(go())
    assert _folders(tmp_path) == {b.slot} and vllm.removed == [(a.slot, True)]


def test_swaps_racing_requests_never_exceed_the_bound(base_fp32, tied, tmp_path):
    """Four tenants, each hot-swapped 6 times while 24 requests of their current versions run for
    random times and 4 of each 24 are cancelled, under a bound of 2: every request that was not
    cancelled ran with its folder on disk, no more than 2 folders were ever on disk, and at the end only
    the idle ones within the bound remain. References: the folder tree sampled at every turn of
    the loop, each request's folder checked while it runs."""
    import random

    rng = random.Random(7)
    residency = _residency(base_fp32, tmp_path)
    vllm, seen = _Vllm(tmp_path), []
    current = {name: _versions(residency, tied, 1)[0] for name in "wxyz"}
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
        old, current[name] = current[name], _versions(residency, tied, 1)[0]
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
    assert len(_folders(tmp_path)) <= 2


def test_the_bound_must_be_positive(base_fp32, tmp_path):
    with pytest.raises(ValueError, match="max_folders"):
        FoldCache(_residency(base_fp32, tmp_path), max_folders=0, remove=_Vllm(tmp_path).remove)
