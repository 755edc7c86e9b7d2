"""The vLLM backend's fold folders on disk (runs in CI, no vllm): a version is folded on its first
request, not on registration; removed only once vLLM has dropped it (the bound under load:
test_vllm_fold_bound.py).

References: the folder tree on disk, a count of the folds written, the order of vLLM's
``remove_lora`` against the folder's deletion (a folder vLLM may still read must not go).
"""

from __future__ import annotations

import asyncio
import time

import pytest

import fold_cache_harness
from fold_cache_harness import FakeVllm, count_folds, folders, residency_of, versions_of
from nlora_serve.engine.vllm_backend import fold_cache as fold_cache_module
from nlora_serve.engine.vllm_backend.fold_cache import FoldCache
from nlora_serve.errors import AdapterError

tied = fold_cache_harness.tied  # the fixture: the tied case adapter, once per module


def test_registering_writes_no_fold_folder_and_held_bytes_are_the_folded_ones(base_fp32, tied, tmp_path):
    residency = residency_of(base_fp32, tmp_path)
    versions = versions_of(residency, tied, 40)
    assert folders(tmp_path) == set() and len({v.slot for v in versions}) == 40
    # what vLLM will hold for it: A [R, in] and B [out, R] per site at the largest rank, fp32 here
    rank = max(s.rank for s in tied.sites.values())
    assert versions[0].held_bytes == 4 * sum(rank * (s.A.shape[1] + s.B.shape[0]) for s in tied.sites.values())


def test_the_first_request_folds_once_however_many_arrive_together(base_fp32, tied, tmp_path, monkeypatch):
    written = count_folds(monkeypatch)
    residency = residency_of(base_fp32, tmp_path)
    versions = versions_of(residency, tied, 3)
    vllm = FakeVllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=2, remove=vllm.remove)
        await asyncio.gather(*(cache.use(versions[1]) for _ in range(4)))
        return cache
    cache = asyncio.run(go())
    assert written == [versions[1].slot] and folders(tmp_path) == {versions[1].slot}
    assert (residency.path(versions[1].slot) / "adapter_model.safetensors").is_file()
    assert cache.users(versions[1].slot) == 4


def test_beyond_the_bound_idle_folders_go_after_vllm_drops_them_and_are_folded_again(
        base_fp32, tied, tmp_path, monkeypatch):
    written = count_folds(monkeypatch)
    residency = residency_of(base_fp32, tmp_path)
    a, b, c = versions_of(residency, tied, 3)
    vllm = FakeVllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=2, remove=vllm.remove)
        for v in (a, b):
            await cache.use(v)
            cache.done(v.slot)
        first = (residency.path(a.slot) / "adapter_model.safetensors").read_bytes()
        assert folders(tmp_path) == {a.slot, b.slot} and vllm.removed == []
        await cache.use(c)  # a third folder: a, the least recently used idle one, goes
        cache.done(c.slot)
        await asyncio.sleep(0.05)
        assert folders(tmp_path) == {b.slot, c.slot} and vllm.removed == [(a.slot, True)]
        await cache.use(a)  # folded again on demand, the same bytes; b (idle, oldest) goes
        await asyncio.sleep(0.05)
        assert folders(tmp_path) == {a.slot, c.slot}
        return first == (residency.path(a.slot) / "adapter_model.safetensors").read_bytes()
    assert asyncio.run(go())
    assert written == [a.slot, b.slot, c.slot, a.slot]


def test_a_folder_is_never_removed_while_its_version_has_a_request_in_flight(base_fp32, tied, tmp_path):
    residency = residency_of(base_fp32, tmp_path)
    a, b, c = versions_of(residency, tied, 3)
    vllm = FakeVllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=2, remove=vllm.remove)
        await cache.use(a)
        await cache.use(b)
        await cache.use(b)
        cache.done(b.slot)  # b still has a request in flight
        third = asyncio.create_task(cache.use(c))  # no room: a and b are in use, neither may go
        await asyncio.sleep(0.05)
        assert not third.done() and folders(tmp_path) == {a.slot, b.slot} and vllm.removed == []
        cache.done(a.slot)  # a is idle now and the least recently used: it goes, c is folded
        await asyncio.wait_for(third, 5)
        assert folders(tmp_path) == {b.slot, c.slot} and vllm.removed == [(a.slot, True)]
        cache.done(b.slot)  # idle, within the bound: kept
        await asyncio.sleep(0.05)
        assert folders(tmp_path) == {b.slot, c.slot}
    asyncio.run(go())


def test_a_request_for_a_version_being_removed_waits_and_gets_a_fresh_fold(base_fp32, tied, tmp_path):
    residency = residency_of(base_fp32, tmp_path)
    a, b = versions_of(residency, tied, 2)
    vllm = FakeVllm(tmp_path)

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
    residency = residency_of(base_fp32, tmp_path)
    (a,) = versions_of(residency, tied, 1)
    vllm = FakeVllm(tmp_path)

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
    residency = residency_of(base_fp32, tmp_path)
    (a,) = versions_of(residency, tied, 1)
    real, calls = fold_cache_module.write_folded_lora, []

    def full_once(adapter, out_dir):
        calls.append(out_dir)
        if len(calls) == 1:
            raise AdapterError("cannot write the adapter folded for vLLM (No space left on device)")
        return real(adapter, out_dir)
    monkeypatch.setattr(fold_cache_module, "write_folded_lora", full_once)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=FakeVllm(tmp_path).remove)
        with pytest.raises(AdapterError, match="No space left"):
            await cache.use(a)
        assert cache.users(a.slot) == 0
        await cache.use(a)
    asyncio.run(go())
    assert len(calls) == 2 and folders(tmp_path) == {a.slot}


def test_a_freed_version_is_dropped_from_vllm_before_its_folder_goes(base_fp32, tied, tmp_path):
    residency = residency_of(base_fp32, tmp_path)
    a, b = versions_of(residency, tied, 2)
    vllm = FakeVllm(tmp_path)

    async def go():
        cache = FoldCache(residency, max_folders=1, remove=vllm.remove)
        await cache.use(a)
        cache.done(a.slot)
        await cache.drop(a.slot)  # freed: no request can ask for it again
        await cache.drop(b.slot)  # freed before any request folded it: vLLM is told all the same
        await cache.use(b)
        return cache.users(a.slot), folders(tmp_path)
    assert asyncio.run(go()) == (0, {b.slot})
    assert vllm.removed == [(a.slot, True), (b.slot, False)]


def test_a_version_freed_while_it_folds_leaves_no_folder(base_fp32, tied, tmp_path, monkeypatch):
    # an unload --force during a version's first fold: its request is cancelled, the version freed
    # and its folder removed at once, and the fold, still running, then wrote it: a folder on disk
    # until shutdown that no bound counted
    residency = residency_of(base_fp32, tmp_path)
    (a,) = versions_of(residency, tied, 1)
    vllm, real = FakeVllm(tmp_path), fold_cache_module.write_folded_lora

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
    assert folders(tmp_path) == set() and vllm.removed == [(a.slot, True)]


def test_the_bound_must_be_positive(base_fp32, tmp_path):
    with pytest.raises(ValueError, match="max_folders"):
        FoldCache(residency_of(base_fp32, tmp_path), max_folders=0, remove=FakeVllm(tmp_path).remove)
