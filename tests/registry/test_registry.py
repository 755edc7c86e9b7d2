"""Registry semantics with a stand-in loader: versions, pins, swap, unload, exact refcounts.

The loader here only parses a tiny JSON config, so these tests exercise the registry's own
bookkeeping.
"""

from __future__ import annotations

import json
import random
import threading
from types import SimpleNamespace

import pytest

from nlora_serve.adapters.runtime.registry import AdapterRegistry
from nlora_serve.adapters.runtime.version import AdapterNotFound, VersionConflict
from nlora_serve.adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore
from nlora_serve.errors import AdapterError


def fake_load(path):
    cfg = json.loads((path / CONFIG_FILE).read_text())
    if cfg.get("bad"):
        raise AdapterError("bad adapter: field 'bad' is set")
    return SimpleNamespace(content_hash=(path / WEIGHTS_FILE).read_bytes().hex(), is_tied=False,
                           flavour="lora", ranks=[4], targets=["q_proj"], held_bytes=lambda: 0)


def fake_load_files(files):
    if json.loads(files[CONFIG_FILE]).get("bad"):
        raise AdapterError("bad adapter: field 'bad' is set")
    return SimpleNamespace(content_hash=files[WEIGHTS_FILE].hex(), is_tied=False,
                           flavour="lora", ranks=[4], targets=["q_proj"], held_bytes=lambda: 0)


def files(payload: bytes, bad: bool = False) -> dict[str, bytes]:
    return {CONFIG_FILE: json.dumps({"bad": bad}).encode(), WEIGHTS_FILE: payload}


@pytest.fixture
def freed():
    return []


@pytest.fixture
def registry(tmp_path, freed):
    return AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files, on_free=freed.append)


def test_request_keeps_its_version_across_a_swap(registry, freed):
    v1 = registry.register("acme", files(b"\x01"))
    held = registry.acquire("acme")
    v2 = registry.swap_weights("acme", b"\x02")
    assert (held.version, v2.version) == (1, 2)
    assert registry.acquire("acme") is v2  # admitted after the switch: the new version
    assert freed == []  # v1 is still held
    registry.release(held)
    assert freed == [v1]
    registry.release(v2)
    assert freed == [v1]  # v2 is current: never freed while current


def test_holders_count_requests_on_every_version_of_a_name(registry, freed):
    # what a forced unload reports as aborted: requests admitted before a swap count too
    registry.register("acme", files(b"\x01"))
    on_v1 = registry.acquire("acme")
    registry.swap_weights("acme", b"\x02")
    on_v2 = [registry.acquire("acme"), registry.acquire("acme")]
    assert registry.holders("acme") == 3 and registry.holders("nobody") == 0
    registry.unload("acme")
    assert registry.holders("acme") == 3  # unloaded, still held until released
    registry.release(on_v1)
    assert registry.holders("acme") == 2
    for v in on_v2:
        registry.release(v)
    assert registry.holders("acme") == 0 and len(freed) == 2


def test_bad_adapter_is_refused_and_the_old_version_serves_on(registry, tmp_path):
    registry.register("acme", files(b"\x01"))
    with pytest.raises(AdapterError, match="field 'bad' is set"):
        registry.register("acme", files(b"\x02", bad=True))
    assert registry.get("acme").version == 1
    assert registry.store.versions("acme") == [1]  # nothing written for the refused one


def test_unknown_and_unloaded_names_are_not_found(registry, freed):
    with pytest.raises(AdapterNotFound, match="'ghost' is not registered"):
        registry.acquire("ghost")
    v1 = registry.register("acme", files(b"\x01"))
    held = registry.acquire("acme")
    assert registry.unload("acme") is v1
    # an unloaded name says so, and how to serve it again (it read "not registered", as a typo does)
    unloaded = ("adapter 'acme' was unloaded by an operator (its files are kept: an admin's "
                "`nlora-serve adapters load --name acme` serves it again)")
    for refused in (registry.acquire, registry.get, registry.unload):
        with pytest.raises(AdapterNotFound) as err:
            refused("acme")
        assert str(err.value) == unloaded
    assert freed == []  # in-flight request finishes first
    registry.release(held)
    assert freed == [v1]
    for impossible in ("x" * 5000, "../acme", "a/b"):  # names no adapter can have: never a disk error
        with pytest.raises(AdapterNotFound, match="is not registered"):
            registry.acquire(impossible)


def test_a_hold_keeps_a_superseded_version_for_requests_queued_after_the_swap(registry, freed):
    """The requests of one response (OpenAI's n) are queued one by one on the version held before
    the first: a swap in between, even with none of them running, frees nothing; a hold is no
    request (refcount, holders); the version is freed when the hold and its last request end."""
    v1 = registry.register("acme", files(b"\x01"))
    held = registry.hold("acme", 2)
    assert held.version is v1
    v2 = registry.swap_weights("acme", b"\x02")
    assert freed == [] and (v1.refcount, v1.holds, registry.holders("acme")) == (0, 1, 0)
    assert registry.acquire_held(held) is v1 and registry.acquire("acme") is v2
    assert (v1.refcount, registry.holders("acme")) == (1, 2)
    registry.let_go(held)  # its second request was never queued
    assert freed == []  # its request runs on
    registry.release(v1)
    assert freed == [v1]
    with pytest.raises(RuntimeError, match="let go more often than held"):
        registry.let_go(held)
    with pytest.raises(RuntimeError, match="a request pinned through a hold with none to come"):
        registry.acquire_held(held)  # let go: the superseded version was freed, nothing to pin
    registry.swap_weights("acme", b"\x03")
    assert freed == [v1] and v2.refcount == 1  # v2's request above holds it: freed when it ends
    registry.release(v2)
    assert freed == [v1, v2]


def test_a_forced_unload_refuses_the_held_versions_requests_still_to_come(registry, freed):
    """A forced unload aborts the requests running on every version of a name: one queued after
    it on a held version must not run, and is told which version was unloaded, however the name
    is served since (loaded again here: 'not registered' would be false)."""
    v1 = registry.register("acme", files(b"\x01"))
    h1 = registry.hold("acme", 1)
    v2 = registry.swap_weights("acme", b"\x02")
    h2 = registry.hold("acme", 1)
    registry.unload("acme", force=True)
    registry.register("acme", files(b"\x03"))
    for held in (h1, h2):
        with pytest.raises(AdapterNotFound) as err:
            registry.acquire_held(held)
        assert str(err.value) == (f"adapter 'acme' v{held.version.version} was unloaded by an operator (UnloadAdapter "
                                  "force=true) while this response's requests were being queued")
    registry.let_go(h1)
    registry.let_go(h2)
    assert freed == [v1, v2] and registry.holders("acme") == 0


def test_an_unload_without_force_lets_a_held_version_queue_the_rest_of_its_requests(registry, freed):
    """Without force, requests in flight finish (DESIGN §3): so do the requests a response holding
    the version has still to queue; the version is freed after them, its folder kept (the newest:
    what a load brings back), and new requests of the name are refused."""
    v1 = registry.register("acme", files(b"\x01"))
    held = registry.hold("acme", 1)
    registry.unload("acme")
    assert registry.acquire_held(held) is v1 and registry.holders("acme") == 1
    with pytest.raises(AdapterNotFound, match="'acme' was unloaded by an operator"):
        registry.acquire("acme")
    registry.let_go(held)
    assert freed == []  # its request runs on
    registry.release(v1)
    assert freed == [v1] and registry.holders("acme") == 0 and registry.store.versions("acme") == [1]


def test_release_more_than_acquire_is_an_error(registry):
    v = registry.register("acme", files(b"\x01"))
    registry.acquire("acme")
    registry.release(v)
    with pytest.raises(RuntimeError, match="released more often than acquired"):
        registry.release(v)


def test_compare_and_swap(registry):
    registry.register("acme", files(b"\x01"))
    registry.swap_weights("acme", b"\x02", if_version=1)
    with pytest.raises(VersionConflict, match="expected current version 1, have 2"):
        registry.swap_weights("acme", b"\x03", if_version=1)
    assert registry.store.versions("acme") == [2]  # v1 was freed at the switch, its folder pruned


def test_rebuild_after_restart_serves_newest_valid_versions(tmp_path):
    store = AdapterStore(tmp_path)
    first = AdapterRegistry(store, fake_load, fake_load_files)
    first.register("acme", files(b"\x01"))
    first.swap_weights("acme", b"\x02")
    first.register("zeta", files(b"\x09"))
    store.write("broken", files(b"\x00", bad=True))  # e.g. written by an older server
    again = AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files)
    assert again.rebuild() == ["acme", "zeta"]
    assert again.get("acme").version == 2 and again.get("acme").content_hash == "02"
    with pytest.raises(AdapterNotFound):
        again.get("broken")


def test_refcounts_exact_under_concurrent_acquire_release_and_swaps(registry, freed):
    registry.register("acme", files(b"\x00"))
    errors = []

    def client(seed):
        rng = random.Random(seed)
        for _ in range(200):
            v = registry.acquire("acme")
            if rng.random() < 0.5:
                threading.Event().wait(0.0001)
            registry.release(v)

    def swapper():
        try:
            for i in range(1, 30):
                registry.swap_weights("acme", bytes([i]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)] + [threading.Thread(target=swapper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    current = registry.get("acme")
    assert current.version == 30 and current.refcount == 0
    assert sorted(v.version for v in freed) == list(range(1, 30))  # every old version freed once
    assert all(v.refcount == 0 and v.freed for v in freed)


def test_superseded_version_folder_lives_until_its_last_holder_releases(registry):
    registry.register("acme", files(b"\x01"))
    held = registry.acquire("acme")
    registry.swap_weights("acme", b"\x02")
    assert registry.store.versions("acme") == [1, 2]
    registry.release(held)
    assert registry.store.versions("acme") == [2]


def test_unload_is_remembered_across_a_restart_until_a_new_version(tmp_path):
    store = AdapterStore(tmp_path)
    first = AdapterRegistry(store, fake_load, fake_load_files)
    first.register("acme", files(b"\x01"))
    first.register("zeta", files(b"\x02"))
    first.unload("acme")
    again = AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files)
    assert again.rebuild() == ["zeta"]
    stored = again.store.latest("acme")  # the files stay: an operator can load them again
    assert again.store.read_files(stored.path) == files(b"\x01")
    again.register("acme", again.store.read_files(stored.path))
    assert AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files).rebuild() == ["acme", "zeta"]


def test_no_version_folder_is_left_behind_by_unload_load_or_restart(tmp_path):
    store = AdapterStore(tmp_path)
    first = AdapterRegistry(store, fake_load, fake_load_files)
    first.register("acme", files(b"\x01"))
    first.unload("acme")  # v1 stays on disk: it is what a load brings back
    assert store.versions("acme") == [1]
    first.register("acme", store.read_files(store.latest("acme").path))  # what LoadAdapter does
    assert store.versions("acme") == [2]  # v1, unloaded and freed long ago, is gone
    held = first.acquire("acme")
    first.register("acme", files(b"\x03"))  # v2 superseded while held: kept until released
    assert store.versions("acme") == [2, 3]
    first.release(held)
    assert store.versions("acme") == [3]
    store.write("acme", files(b"\x04"))  # e.g. a crash after the write, before the switch
    store.write("acme", files(b"\x05"))
    again = AdapterRegistry(AdapterStore(tmp_path), fake_load, fake_load_files)
    assert again.rebuild() == ["acme"] and again.get("acme").content_hash == "05"
    again.store.wait_deleted()
    assert again.store.versions("acme") == [5]
    assert sorted(p.name for p in (tmp_path / "acme").iterdir()) == ["00000005"]


@pytest.mark.parametrize("unloaded_first", [True, False], ids=["loaded-again", "first-upload"])
def test_a_name_being_loaded_says_so_while_its_version_is_written(registry, unloaded_first):
    """Loading a name back removes the store's unload record before the new version is switched
    to: a request in between read 'is not registered' (a live stress run: a tenant's 404 for a
    name an operator was loading); it, and one during a first upload, is told the name is being
    loaded. Before and after, the usual answers."""
    if unloaded_first:
        registry.register("acme", files(b"\x01"))
        registry.unload("acme")
    write = registry.store.write
    during = []

    def write_and_ask(name, *args, **kwargs):  # asked once written (the unload record gone), not switched to
        stored = write(name, *args, **kwargs)
        with pytest.raises(AdapterNotFound) as err:
            registry.acquire(name)
        during.append(str(err.value))
        return stored

    registry.store.write = write_and_ask
    v = registry.register("acme", files(b"\x02"))
    assert during == ["adapter 'acme' is being loaded by an operator and is not served yet; retry shortly"]
    assert registry.acquire("acme") is v
    registry.store.write = write
    with pytest.raises(AdapterNotFound, match="'other' is not registered"):
        registry.acquire("other")
    registry.release(v)
    registry.unload("acme")
    registry.store.write = write_and_ask
    with pytest.raises(AdapterError, match="bad adapter"):  # refused before the store: nothing is loading
        registry.register("acme", files(b"\x03", bad=True))
    assert len(during) == 1
    with pytest.raises(AdapterNotFound, match="'acme' was unloaded by an operator"):
        registry.acquire("acme")


def test_the_requests_holds_have_still_to_queue_are_counted_until_queued_or_let_go(registry):
    """What an unload without force leaves to run: the requests running (holders) and those the
    responses holding a version have still to queue (to_come), over every version of the name;
    each hold counts its own, pinned or let go (hand-counted)."""
    v1 = registry.register("acme", files(b"\x01"))
    n3 = registry.hold("acme", 3)  # an n=3 response
    batch = registry.hold("acme", 4)  # 2 prompts x n=2
    registry.acquire_held(n3)
    registry.acquire_held(batch)
    registry.acquire_held(batch)
    registry.swap_weights("acme", b"\x02")
    late = registry.hold("acme", 2)  # on v2
    registry.acquire("acme")  # a one-request response, on v2
    assert (registry.holders("acme"), registry.to_come("acme")) == (4, 2 + 2 + 2)
    assert (v1.to_come, late.version.to_come, n3.to_come, batch.to_come) == (4, 2, 2, 2)
    registry.let_go(n3)  # its request failed: the other two are never queued
    registry.acquire_held(late)
    assert (registry.holders("acme"), registry.to_come("acme")) == (5, 2 + 1)
    registry.acquire_held(batch)
    registry.acquire_held(batch)
    with pytest.raises(RuntimeError, match="a request pinned through a hold with none to come"):
        registry.acquire_held(batch)  # a fifth: more than it was taken for
    registry.let_go(batch)
    registry.let_go(late)
    assert (registry.holders("acme"), registry.to_come("acme"), v1.to_come, v1.refcount) == (7, 0, 0, 1 + 4)
