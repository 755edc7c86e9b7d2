"""The on-disk adapter store: versions, containment, and crash consistency."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from nlora_serve.adapters.store import CONFIG_FILE, STAGING, WEIGHTS_FILE, AdapterStore
from nlora_serve.errors import AdapterError

FILES = {CONFIG_FILE: b'{"r": 4}', WEIGHTS_FILE: b"\x00" * 64}


def test_versions_count_up_and_survive_a_restart(tmp_path):
    store = AdapterStore(tmp_path)
    first = store.write("acme", FILES)
    second = store.write("acme", {**FILES, WEIGHTS_FILE: b"\x01" * 64})
    assert (first.version, second.version) == (1, 2)
    assert first.content_hash != second.content_hash
    reopened = AdapterStore(tmp_path)
    assert reopened.names() == ["acme"]
    latest = reopened.latest("acme")
    assert latest.version == 2 and latest.content_hash == second.content_hash
    assert reopened.read_files(latest.path)[WEIGHTS_FILE] == b"\x01" * 64


def test_a_bad_entry_is_skipped_with_one_warning_per_warning_scan(tmp_path, caplog):
    store = AdapterStore(tmp_path)
    store.write("acme", FILES)
    (tmp_path / "not a name!").mkdir()
    with caplog.at_level("WARNING", logger="nlora_serve.adapters.store"):
        assert store.names(warn=False) == ["acme"]  # serve's peek before the registry's scan
        assert not caplog.records
        assert store.names() == ["acme"]
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith(f"skipping store entry {str(tmp_path / 'not a name!')!r}: ")


def test_content_hash_matches_hand_computed_sha256(tmp_path):
    h = hashlib.sha256()
    h.update(b"adapter_config.json|8\n" + FILES[CONFIG_FILE])
    h.update(b"adapter_model.safetensors|64\n" + FILES[WEIGHTS_FILE])
    assert AdapterStore(tmp_path).write("acme", FILES).content_hash == h.hexdigest()


@pytest.mark.parametrize("name", ["../evil", "/abs", ".hidden", "a/b", "", "x" * 129, "a\x00b"])
def test_escaping_or_invalid_names_are_refused_and_nothing_is_written(tmp_path, name):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterError, match="is not valid"):
        store.write(name, FILES)
    assert sorted(os.listdir(tmp_path)) == ["store"]
    assert os.listdir(tmp_path / "store") == [STAGING]


def test_symlinked_adapter_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = AdapterStore(tmp_path / "store")
    os.symlink(outside, tmp_path / "store" / "sneaky")
    with pytest.raises(AdapterError, match="symlink or leaves the store"):
        store.write("sneaky", FILES)
    assert os.listdir(outside) == []
    assert store.names() == []


def test_unknown_file_names_are_refused(tmp_path):
    store = AdapterStore(tmp_path)
    with pytest.raises(AdapterError, match=r"files \['../x'\] are not allowed"):
        store.write("acme", {**FILES, "../x": b""})
    assert store.names() == []


def test_crash_before_rename_leaves_no_visible_version(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    store.write("acme", FILES)

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="power cut"):
        store.write("acme", {**FILES, WEIGHTS_FILE: b"\x02" * 64})
    monkeypatch.undo()
    reopened = AdapterStore(tmp_path)
    assert reopened.versions("acme") == [1]
    assert reopened.read_files(reopened.latest("acme").path) == FILES
    assert os.listdir(tmp_path / STAGING) == []


def test_half_written_staging_folder_is_discarded_on_start(tmp_path):
    AdapterStore(tmp_path).write("acme", FILES)
    leftover = tmp_path / STAGING / "acme.partial"
    leftover.mkdir()
    (leftover / WEIGHTS_FILE).write_bytes(b"\x03" * 10)
    reopened = AdapterStore(tmp_path)
    assert not leftover.exists()
    assert reopened.versions("acme") == [1]


def test_a_second_open_in_the_process_leaves_the_first_stores_writes_in_flight(tmp_path):
    # every open wiped the staging area, also one of a root this process already held open (the lock
    # is shared in a process): that store's version being staged there went with it, and its rename
    # into place failed. Only the first open, which took the lock, can find a crash's leftovers.
    store = AdapterStore(tmp_path)
    staged = tmp_path / STAGING / "acme.in-flight"  # as StoreWrites.write stages a version
    staged.mkdir()
    (staged / WEIGHTS_FILE).write_bytes(b"\x03" * 10)
    again = AdapterStore(tmp_path)
    assert (staged / WEIGHTS_FILE).read_bytes() == b"\x03" * 10
    del store, again  # the lock goes with the last of them: the next open is a first one again
    AdapterStore(tmp_path)
    assert os.listdir(tmp_path / STAGING) == []


def test_concurrent_writers_get_distinct_versions(tmp_path):
    store = AdapterStore(tmp_path)
    threads = [threading.Thread(target=store.write, args=("acme", {CONFIG_FILE: bytes([i])}))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.versions("acme") == list(range(1, 9))
    payloads = {store.read_files(store.get("acme", v).path)[CONFIG_FILE] for v in range(1, 9)}
    assert payloads == {bytes([i]) for i in range(8)}


def test_remove_version(tmp_path):
    store = AdapterStore(tmp_path)
    store.write("acme", FILES)
    store.write("acme", FILES)
    store.remove_version("acme", 1)
    assert store.versions("acme") == [2]
    with pytest.raises(AdapterError, match="has no version 1"):
        store.get("acme", 1)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(root)``: from then on the calls the store makes fail under ``root`` as the kernel
    fails them on a read-only mount (EROFS, also for an unlink or rmdir of nothing)."""
    import errno

    from nlora_serve.adapters.store import durable

    def arm(root):
        root = str(root)

        def refuse(path):
            if str(path).startswith(root):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

        for name in ("mkdir", "rmdir", "unlink"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, lambda path, *a, _real=real, **k: (refuse(path), _real(path, *a, **k))[1])
        # the store's writes (open, link, rename) through its fault hook; monkeypatch restores it
        monkeypatch.setattr(durable, "_hook", lambda op: None if op.kind.startswith("fsync") else refuse(op.path))

    return arm


def test_a_read_only_store_is_refused_at_open_naming_it(tmp_path, read_only):
    """It was a bare FileExistsError traceback (the staging folder left in place)."""
    store = AdapterStore(tmp_path / "store")
    store.write("acme", FILES)
    del store
    read_only(tmp_path / "store")
    with pytest.raises(AdapterError) as err:
        AdapterStore(tmp_path / "store")
    assert str(err.value) == (f"adapter store {tmp_path / 'store'}: cannot clear and create its staging folder "
                              ".staging (Read-only file system); the store must be a writable folder")
    with pytest.raises(AdapterError, match="cannot create it .Read-only file system.$"):
        AdapterStore(tmp_path / "store" / "new")


def test_an_unload_a_read_only_store_refuses_is_a_store_write_error(tmp_path, read_only):
    """The clean-up's own unlink (EROFS even for nothing) hid it as a bare OSError (gRPC UNKNOWN)."""
    from nlora_serve.adapters.store.durable import StoreWriteError

    store = AdapterStore(tmp_path / "store")
    store.write("acme", FILES)
    read_only(tmp_path / "store")
    with pytest.raises(StoreWriteError, match=r"adapter 'acme': the adapter store's disk refused the write "
                                              r"\(EROFS: Read-only file system\)"):
        store.mark_unloaded("acme")
    assert not store.is_unloaded("acme") and store.names() == ["acme"]


def test_an_adapter_folder_copied_into_the_store_is_named_not_silently_skipped(tmp_path, caplog):
    """`cp -r my-adapter STORE/` (one folder per name, DESIGN §3) served nothing and said nothing:
    requests for it got NOT_FOUND with no line in the log to say why."""
    store = AdapterStore(tmp_path)
    store.write("acme", FILES)
    (tmp_path / "copied").mkdir()
    for name, data in FILES.items():
        (tmp_path / "copied" / name).write_bytes(data)
    (tmp_path / "empty").mkdir()  # no adapter files: nothing to say
    with caplog.at_level("WARNING", logger="nlora_serve.adapters.store"):
        assert store.names() == ["acme"]
    assert [r.getMessage()[:70] for r in caplog.records] == [
        f"store entry {str(tmp_path / 'copied')!r} not served: it holds adapter files but no v"[:70]]


def _member(root, name: str, version: int, family: str) -> None:
    """A version folder whose config names ``family``'s shared factors, as a family member's does."""
    folder = root / name / f"{version:08d}"
    folder.mkdir(parents=True)
    header = {"format": "family-n", "family": family, "base_fingerprint": "0" * 64}
    (folder / CONFIG_FILE).write_text(f'{{"r": 4, "nlora_serve": {json.dumps(header)}}}')
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 64)


def test_family_factors_no_version_uses_are_removed_at_the_next_open_and_no_others(tmp_path):
    """A family's shared factors (_families/<key>) stayed on disk for ever once no member used
    them (s30). Now the store's first open removes those no version's config names: a served
    member's, an unloaded name's and a version kept to roll back to are all kept."""
    keys = {k: hashlib.sha256(k.encode()).hexdigest() for k in ("served", "kept", "unloaded", "orphan")}
    root = tmp_path / "store"
    for key in keys.values():
        (root / "_families" / key).mkdir(parents=True)
        (root / "_families" / key / "family.safetensors").write_bytes(b"factors")
    _member(root, "acme", 1, keys["kept"])  # kept by --keep-versions, below the current one
    _member(root, "acme", 2, keys["served"])
    _member(root, "globex", 1, keys["unloaded"])
    (root / "globex" / "UNLOADED").write_text("")
    broken = tmp_path / "broken"  # a config that cannot be read: it may name any family, nothing goes
    (broken / "_families" / keys["orphan"]).mkdir(parents=True)
    _member(broken, "acme", 1, keys["served"])
    (broken / "acme" / "00000001" / CONFIG_FILE).write_text("{not json")
    AdapterStore(root), AdapterStore(broken)
    assert sorted(os.listdir(root / "_families")) == sorted(keys[k] for k in ("served", "kept", "unloaded"))
    assert os.listdir(root / STAGING) == [] and os.listdir(broken / "_families") == [keys["orphan"]]
