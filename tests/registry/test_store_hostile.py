"""A hostile adapter store (someone with write access to --adapter-dir): links, FIFOs and other
non-regular files are refused by name at every level, and nothing is read through them."""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest

from nlora_serve.adapters.store import durable
from nlora_serve.adapters.family import FACTORS_FILE, FAMILIES_DIR, FamilyResolver
from nlora_serve.adapters.format import read_header_bytes
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.store import CONFIG_FILE, WEIGHTS_FILE, AdapterStore
from nlora_serve.errors import AdapterError
from nlora_serve.serving.commands import serve as serve_cli
from nlora_serve.serving.commands import serve_build

CASE = Path(__file__).resolve().parents[1] / "data" / "cases" / "lora-layers-subset"
FILES = {CONFIG_FILE: b'{"r": 4}', WEIGHTS_FILE: b"\x00" * 64}


def _the_stores_fault(exc: AdapterError) -> None:
    """A store entry that cannot be read is the store's fault, not the admin call's that read it
    (gRPC LoadAdapter, HTTP /v1/load_lora_adapter): INTERNAL / 500 adapter_load_failed, as a file
    that fails its SHA256SUMS (it was INVALID_ARGUMENT / 400, blaming the call)."""
    import grpc

    from nlora_serve.serving.status import http_status_of, status_of

    assert isinstance(exc, durable.StoreReadError)
    assert status_of(exc) == (grpc.StatusCode.INTERNAL, "adapter_load_failed")
    assert http_status_of(exc) == (500, "adapter_load_failed")


def _relink(target: Path, link: Path) -> None:
    """Replace the file ``link`` by a symbolic link to ``target``."""
    link.unlink()
    os.symlink(target, link)


@pytest.mark.parametrize("fname", [WEIGHTS_FILE, CONFIG_FILE])
def test_a_linked_file_of_a_version_is_refused_by_its_path_in_the_store(tmp_path, fname):
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    store = AdapterStore(tmp_path / "store")
    stored = store.write("acme", FILES)
    _relink(outside, stored.path / fname)
    for read in (lambda: store.read_files(stored.path), lambda: stored.content_hash):
        with pytest.raises(AdapterError) as err:
            read()
        assert str(err.value).startswith(f"adapter store entry acme/00000001/{fname} is a symbolic link")
        assert "secret" not in str(err.value)
        _the_stores_fault(err.value)


def test_a_linked_version_folder_is_refused(tmp_path):
    store = AdapterStore(tmp_path / "store")
    elsewhere = store.write("zeta", FILES).path
    os.symlink(elsewhere, tmp_path / "store" / "zeta" / "00000002")
    assert store.versions("zeta") == [1]  # never listed as a version
    with pytest.raises(AdapterError, match="^adapter store entry zeta/00000002 is a symbolic link"):
        store.read_files(tmp_path / "store" / "zeta" / "00000002")


def test_a_fifo_or_folder_in_place_of_a_file_is_refused_without_blocking(tmp_path):
    store = AdapterStore(tmp_path / "store")
    stored = store.write("acme", FILES)
    (stored.path / WEIGHTS_FILE).unlink()
    os.mkfifo(stored.path / WEIGHTS_FILE)  # an open for reading would wait for a writer forever
    with pytest.raises(AdapterError, match=f"^adapter store entry acme/00000001/{WEIGHTS_FILE} is not a regular file") as err:
        store.read_files(stored.path)
    _the_stores_fault(err.value)
    (stored.path / CONFIG_FILE).unlink()
    (stored.path / CONFIG_FILE).mkdir()
    with pytest.raises(AdapterError, match=f"^adapter store entry acme/00000001/{CONFIG_FILE} is not a regular file"):
        store.read_files(stored.path)


def test_a_store_folder_gone_while_serving_is_a_store_error_naming_it(tmp_path):
    """An upload, a swap (its config linked from the version before) or an unload on a store removed
    or unmounted under the server failed with UNKNOWN "Unexpected <class 'FileNotFoundError'>"."""
    store = AdapterStore(tmp_path / "store")
    stored = store.write("acme", FILES)
    moved = Path(shutil.move(store.root, tmp_path / "moved"))
    swap = {CONFIG_FILE: stored.path / CONFIG_FILE}
    for name, write in (("acme", lambda: store.write("acme", FILES)), ("globex", lambda: store.write("globex", FILES)),
                        ("acme", lambda: store.write("acme", {WEIGHTS_FILE: FILES[WEIGHTS_FILE]}, swap)),
                        ("acme", lambda: store.mark_unloaded("acme"))):
        with pytest.raises(durable.StoreWriteError, match=rf"^adapter '{name}': the adapter store {store.root} is "
                                                          r"gone \(no such folder: removed or unmounted"):
            write()
    assert not store.root.exists() and sorted(os.listdir(moved / "acme")) == ["00000001"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
@pytest.mark.parametrize("kind", ["mkdir", "create", "rename"])
def test_a_store_folder_the_server_may_not_write_is_a_store_error_naming_the_path(tmp_path, code, kind):
    """A version folder of another user's (EACCES) or an immutable one (chattr +i: EPERM, root
    included) failed an upload, a swap or an unload with gRPC UNKNOWN "Unexpected <class
    'PermissionError'>" and a traceback, where a read-only mount (EROFS) was a StoreWriteError."""
    import grpc

    from nlora_serve.serving.status import http_status_of, status_of

    store = AdapterStore(tmp_path / "store")
    stored = store.write("acme", FILES)
    before = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*"))

    def refuse(op: durable.FileOp) -> None:  # as os raises them: a rename names both paths
        if op.kind == kind:
            raise OSError(code, os.strerror(code), str(op.path), None, op.target and str(op.target))
    swap = {CONFIG_FILE: stored.path / CONFIG_FILE}
    writes = [("acme", lambda: store.write("acme", FILES)), ("globex", lambda: store.write("globex", FILES)),
              ("acme", lambda: store.write("acme", {WEIGHTS_FILE: FILES[WEIGHTS_FILE]}, swap))]
    if kind == "create":  # an unload's record is one file, created in the adapter's folder
        writes.append(("acme", lambda: store.mark_unloaded("acme")))
    previous = durable.set_fault_hook(refuse)
    try:
        for name, write in writes:
            with pytest.raises(durable.StoreWriteError) as err:
                write()
            message = str(err.value)
            assert message.startswith(f"adapter {name!r}: the adapter store's disk refused the write "
                                      f"({errno.errorcode[code]}: {os.strerror(code)}) on "), message
            if kind == "rename":  # the version's move into place: the folder refused is where it goes
                assert f" to {store.root / name}/0000000" in message, message
            else:
                assert f" on {store.root}/" in message, message
            assert "write access to the store" in message, message
            assert status_of(err.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "store_write_failed")
            assert http_status_of(err.value) == (507, "store_write_failed")
    finally:
        durable.set_fault_hook(previous)
    store.wait_deleted()
    assert sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")) == before
    assert not store.is_unloaded("acme")


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_swap_whose_linked_config_is_gone_is_the_stores_fault_naming_it(tmp_path, when):
    """An operator who deletes STORE/NAME while the server runs (README: only with it stopped):
    a hot-swap, which links the current version's config, failed with gRPC UNKNOWN "Unexpected
    <class 'FileNotFoundError'>" and a traceback. ``during``: removed after the size check, as the
    link is made."""
    store = AdapterStore(tmp_path / "store")
    stored = store.write("acme", FILES)
    config = stored.path / CONFIG_FILE

    def remove_at_link(op: durable.FileOp) -> None:
        if op.kind == "link" and os.path.exists(config):
            shutil.rmtree(stored.path.parent)
    if when == "before":
        shutil.rmtree(stored.path.parent)
    previous = durable.set_fault_hook(remove_at_link if when == "during" else None)
    try:
        with pytest.raises(AdapterError) as err:
            store.write("acme", {WEIGHTS_FILE: FILES[WEIGHTS_FILE]}, {CONFIG_FILE: config})
    finally:
        durable.set_fault_hook(previous)
    assert str(err.value).startswith(f"adapter 'acme': its stored file {config} is gone (its version folder was "
                                     "removed while the server runs)"), str(err.value)
    _the_stores_fault(err.value)
    store.wait_deleted()
    assert not store.versions("acme") and os.listdir(store.root / ".staging") == []


def test_a_name_deleted_by_hand_while_served_goes_on_from_its_version_number(tmp_path):
    """Versions are per-name sequence numbers (DESIGN §3). After ``rm -rf STORE/acme`` while acme
    v2 served, the next upload was v1 again, then a second v2, ...: two live versions of one
    number, and the old v2's release (registry._free, by number, once a v3 was on disk) deleted
    the new v2's folder. A restart starts from what is on disk."""
    store = AdapterStore(tmp_path / "store")
    assert [store.write("acme", FILES).version for _ in range(2)] == [1, 2]
    shutil.rmtree(store.root / "acme")
    assert store.write("acme", FILES).version == 3  # was 1
    restarted_root = tmp_path / "other"
    shutil.copytree(store.root / "acme", restarted_root / "acme")
    restarted = AdapterStore(restarted_root)
    assert restarted.versions("acme") == [3]  # as a start lists it, then the folder goes
    shutil.rmtree(restarted_root / "acme")
    assert restarted.write("acme", FILES).version == 4


def test_a_path_outside_the_store_is_refused(tmp_path):
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterError, match="is not a folder of the adapter store"):
        store.read_files(CASE)


def _store_with(tmp_path, base) -> tuple[Path, Path]:
    """A store serving acme and sneaky (the same LoRA case); returns (root, sneaky's weights)."""
    root = tmp_path / "store"
    manager = AdapterManager(base, root)
    manager.register_dir("acme", CASE)
    sneaky = manager.register_dir("sneaky", CASE)
    manager.registry.store.wait_deleted()
    return root, sneaky.path / WEIGHTS_FILE


@pytest.mark.parametrize("target", ["copy", "/proc/self/environ"])
def test_restore_refuses_a_linked_weights_file_and_leaks_nothing_of_its_target(base_fp32, tmp_path, caplog, target):
    root, weights = _store_with(tmp_path, base_fp32)
    if target == "copy":  # a valid adapter outside the store
        target = tmp_path / "outside.safetensors"
        shutil.copy(CASE / WEIGHTS_FILE, target)
    _relink(Path(target), weights)
    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.runtime.registry"):
        restarted = AdapterManager(base_fp32, root)
    assert [v.name for v in restarted.versions()] == ["acme"]
    (record,) = [r for r in caplog.records if "sneaky" in r.getMessage()]
    assert f"adapter store entry sneaky/00000001/{WEIGHTS_FILE} is a symbolic link" in record.getMessage()
    with pytest.raises(AdapterError, match="is a symbolic link"):  # LoadAdapter's read of the stored files
        restarted.registry.store.read_files(weights.parent)


def test_a_header_length_that_does_not_fit_is_not_printed_when_it_is_file_text():
    environ = b"HOME=/root\x00PATH=/usr/bin\x00SECRET=hunter2\x00"
    with pytest.raises(AdapterError) as err:
        read_header_bytes(environ)
    assert str(int.from_bytes(environ[:8], "little")) not in str(err.value)
    assert "header length" in str(err.value)
    small = (9).to_bytes(8, "little") + b"{}"  # a length no larger than the file is shown
    with pytest.raises(AdapterError, match="header length 9 does not fit 10 bytes"):
        read_header_bytes(small)


def test_a_linked_family_factors_file_is_refused(base_fp32, tmp_path):
    key = "ab" * 32
    folder = tmp_path / "store" / FAMILIES_DIR / key
    folder.mkdir(parents=True)
    os.symlink(CASE / WEIGHTS_FILE, folder / FACTORS_FILE)
    shown = f"{FAMILIES_DIR}/{key}/{FACTORS_FILE}"
    with pytest.raises(AdapterError, match=f"^adapter store entry {shown} is a symbolic link"):
        FamilyResolver(base_fp32.spec, (tmp_path / "store",)).get(key)


@pytest.fixture
def reads(monkeypatch):
    """The sizes asked of every store file read (the size check must come before any)."""
    seen, real = [], durable._read_all
    monkeypatch.setattr(durable, "_read_all", lambda fd, size: seen.append(size) or real(fd, size))
    return seen


def test_files_over_max_bytes_are_refused_from_fstat_before_any_read(tmp_path, reads):
    store = AdapterStore(tmp_path / "store", max_bytes=100)
    stored = store.write("acme", FILES)  # 8 + 64 = 72 bytes
    sums = sum(64 + 2 + len(f) + 1 for f in FILES)  # SHA256SUMS: "<hex>  <name>\n" a file, its own cap
    assert store.read_files(stored.path) == FILES and sorted(reads) == [8, 64, sums]
    reads.clear()
    os.truncate(stored.path / WEIGHTS_FILE, 93)  # 8 + 93 = 101
    with pytest.raises(AdapterError) as err:
        store.read_files(stored.path)
    assert str(err.value) == (f"adapter store folder acme/00000001: {CONFIG_FILE} + {WEIGHTS_FILE} are 101 bytes, "
                              "over the server's --max-adapter-bytes 100: refusing to read them")
    assert reads == []


def test_a_version_over_max_bytes_is_not_written(tmp_path):
    store = AdapterStore(tmp_path / "store", max_bytes=100)
    with pytest.raises(AdapterError, match="acme.: 101 bytes of files is over the server's --max-adapter-bytes 100"):
        store.write("acme", {CONFIG_FILE: b"{}", WEIGHTS_FILE: b"\x00" * 99})
    assert store.names() == [] and os.listdir(tmp_path / "store" / ".staging") == []


def test_restore_refuses_a_300_mb_weights_file_without_reading_it(base_fp32, tmp_path, caplog, reads):
    root, weights = _store_with(tmp_path, base_fp32)
    os.truncate(weights, 300_000_000)  # sparse: no disk used
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.runtime.registry"):
        restarted = AdapterManager(base_fp32, root)  # the default limit: 256 MiB
    assert [v.name for v in restarted.versions()] == ["acme"]
    assert max(reads) < 1 << 20  # acme's files only
    (record,) = [r for r in caplog.records if "sneaky" in r.getMessage()]
    assert f"are {300_000_000 + (CASE / CONFIG_FILE).stat().st_size} bytes, over the server's " \
           f"--max-adapter-bytes {256 << 20}" in record.getMessage()


def test_the_limit_is_the_servers_max_adapter_bytes_flag(base_fp32, tmp_path, caplog):
    root, _ = _store_with(tmp_path, base_fp32)
    size = sum((CASE / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    _, engine_config = serve_build._configs(parser.parse_args(["--adapter-dir", str(root),
                                                             "--max-adapter-bytes", str(size - 1)]))
    assert engine_config.adapter_limits.max_adapter_bytes == size - 1
    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.runtime.registry"):
        assert AdapterManager(base_fp32, root, engine_config.adapter_limits).versions() == []
    assert len([r for r in caplog.records if f"--max-adapter-bytes {size - 1}" in r.getMessage()]) == 2


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_staging_area_that_is_a_link_or_a_file_is_replaced_and_nothing_outside_is_touched(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"x")
    root = tmp_path / "store"
    root.mkdir()
    if kind == "link":
        os.symlink(outside, root / ".staging")
    else:
        (root / ".staging").write_bytes(b"x")
    store = AdapterStore(root)
    assert (root / ".staging").is_dir() and not (root / ".staging").is_symlink()
    store.write("acme", FILES)
    assert os.listdir(outside) == ["keep"] and store.names() == ["acme"]


def test_a_store_file_that_cannot_be_read_is_skipped_at_restore_not_a_crash(base_fp32, tmp_path, caplog, monkeypatch):
    root, weights = _store_with(tmp_path, base_fp32)
    real = durable._read_all

    def failing(fd, size):  # (a chmod 000 would not stop root, who runs the tests here)
        if os.fstat(fd).st_ino == weights.stat().st_ino:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, size)

    monkeypatch.setattr(durable, "_read_all", failing)
    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.runtime.registry"):
        assert [v.name for v in AdapterManager(base_fp32, root).versions()] == ["acme"]
    (record,) = [r for r in caplog.records if "sneaky" in r.getMessage()]
    assert f"adapter store folder sneaky/00000001: cannot read it ({os.strerror(errno.EIO)})" in record.getMessage()


def test_an_unreadable_store_entry_is_skipped_with_a_warning_not_a_crash(tmp_path, caplog, monkeypatch):
    store = AdapterStore(tmp_path)
    store.write("acme", FILES)
    store.write("zeta", FILES)
    real = os.scandir

    def scandir(path="."):  # (a chmod 000 would not stop root, who runs the tests here)
        if os.path.basename(path) == "acme":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr("nlora_serve.adapters.store.reads.os.scandir", scandir)
    with caplog.at_level("WARNING", logger="nlora_serve.adapters.store"):
        assert store.names() == ["zeta"]
    assert "skipping store entry" in caplog.text and "Permission denied" in caplog.text


@pytest.mark.parametrize("stray", ["3", "٣", "²", "000000002", "00000000", "backup"])
def test_a_folder_not_named_as_a_version_is_no_version(base_fp32, tmp_path, stray):
    """str.isdigit took these for versions: a stray "3" or "٣" made latest() look for 00000003 and
    fail the whole start ("has no version 3"), "²" crashed it in int()."""
    root, _ = _store_with(tmp_path, base_fp32)
    (root / "acme" / stray).mkdir()
    store = AdapterStore(root)
    assert store.versions("acme") == [1] and store.latest("acme").path == root / "acme" / "00000001"
    restarted = AdapterManager(base_fp32, root)
    assert [(v.name, v.version) for v in restarted.versions()] == [("acme", 1), ("sneaky", 1)]
    # other content (the same content is the current version again, nothing written)
    assert restarted.register_dir("acme", CASE.parent / "lora-rslora").path == root / "acme" / "00000002"
    assert (root / "acme" / stray).is_dir()  # not the store's to delete


def test_an_evicted_lora_whose_files_changed_on_disk_is_not_loaded_back(base_fp32, tmp_path, caplog):
    """A cold load re-read the store folder and served whatever it held under the registered
    version and hash (bit rot or a hand edit that is still a valid adapter): responses named the old
    hash, and prefix-cache blocks computed with the old weights were reused with the new ones."""
    from safetensors.torch import load, save

    from nlora_serve.adapters.limits import AdapterLimits
    from nlora_serve.adapters.runtime.residency import AdapterLoadFailed

    manager = AdapterManager(base_fp32, tmp_path / "store", limits=AdapterLimits(max_loras=1))
    acme = manager.register_dir("acme", CASE)
    manager.register_dir("zeta", CASE.parent / "lora-rslora")
    manager.release(manager.acquire("zeta"))
    assert acme.adapter is None  # evicted: zeta holds the one slot
    weights = acme.path / WEIGHTS_FILE
    weights.write_bytes(save({k: 2 * t for k, t in load(weights.read_bytes()).items()}))
    with caplog.at_level(logging.ERROR, logger="nlora_serve.adapters.runtime.residency"):
        with pytest.raises(AdapterLoadFailed, match="^adapter 'acme' v1 could not be loaded back"):
            manager.acquire("acme")
    found = hashlib.sha256(weights.read_bytes()).hexdigest()  # refused by the version's SHA256SUMS first
    assert f"its stored file {weights} has sha256 {found}, but the store recorded sha256" in caplog.text
    assert acme.adapter is None and acme.refcount == 0 and manager.residency.lora_pool.used == 0  # no slot kept


def test_a_store_folder_named_with_a_newline_cannot_forge_a_log_line(tmp_path, caplog):
    """The warning printed the entry's path raw: a folder 'x\\nERROR ...: forged' wrote two lines, the
    second one the forger's, and an ANSI escape reached the operator's terminal."""
    forged = "x\nERROR nlora_serve.serving: forged\x1b[31m"
    (tmp_path / "store" / forged / "00000001").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.store"):
        assert AdapterStore(tmp_path / "store").names() == []
    (record,) = caplog.records
    assert record.getMessage().startswith(f"skipping store entry {str(tmp_path / 'store' / forged)!r}: adapter name")
    assert "\n" not in record.getMessage() and "\x1b" not in record.getMessage()
