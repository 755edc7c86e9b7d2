"""Each stored version's files' sha256, recorded on disk when written (SHA256SUMS) and checked at
every read: a stored file replaced between restarts by another valid adapter was served at the next
start under a fresh content hash, silently. Expected hashes come from hashlib over the bytes."""

from __future__ import annotations

import errno
import hashlib
import logging
from pathlib import Path

import pytest
from safetensors.torch import load, save

from nlora_serve.adapters.store import durable
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.store import CONFIG_FILE, STAGING, WEIGHTS_FILE, AdapterStore

CASE = Path(__file__).resolve().parents[1] / "data" / "cases" / "lora-layers-subset"
SUMS = "SHA256SUMS"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sums_text(files: dict[str, bytes]) -> str:
    """sha256sum's output for ``files``, names sorted."""
    return "".join(f"{_sha(files[f])}  {f}\n" for f in sorted(files))


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the store but the staging area's, by path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and STAGING not in p.parts}


def _another_valid_adapter(weights: Path) -> bytes:
    """The same keys and shapes, other values: still a valid adapter of the same config."""
    return save({k: 2 * t for k, t in load(weights.read_bytes()).items()})


def test_a_version_is_written_with_the_sha256_of_its_files_also_when_its_config_is_linked(tmp_path):
    store = AdapterStore(tmp_path / "store")
    files = {CONFIG_FILE: b'{"r": 4}', WEIGHTS_FILE: bytes(range(64))}
    first = store.write("acme", files)
    assert (first.path / SUMS).read_text() == _sums_text(files)
    swapped = store.write("acme", {WEIGHTS_FILE: b"\x01" * 64}, same_as={CONFIG_FILE: first.path / CONFIG_FILE})
    linked = {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: b"\x01" * 64}
    assert (swapped.path / SUMS).read_text() == _sums_text(linked)


def test_a_file_replaced_between_restarts_refuses_that_version_only_and_changes_nothing(base_fp32, tmp_path, caplog):
    root = tmp_path / "store"
    manager = AdapterManager(base_fp32, root)
    acme, beta = manager.register_dir("acme", CASE), manager.register_dir("beta", CASE)
    weights = acme.path / WEIGHTS_FILE
    original = weights.read_bytes()
    expected = _sha(original)
    weights.write_bytes(_another_valid_adapter(weights))
    found = _sha(weights.read_bytes())
    before = _snapshot(root)
    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.runtime.registry"):
        restarted = AdapterManager(base_fp32, root)
    assert [(v.name, v.content_hash) for v in restarted.versions()] == [("beta", beta.content_hash)]
    (line,) = [r.getMessage() for r in caplog.records if "acme" in r.getMessage()]
    assert all(part in line for part in ("'acme'", str(weights), f"sha256 {found}", f"recorded sha256 {expected}"))
    assert _snapshot(root) == before  # nothing lost or rewritten: the operator can put the file back
    weights.write_bytes(original)  # put back: served again
    assert [v.name for v in AdapterManager(base_fp32, root).versions()] == ["acme", "beta"]


def test_a_malformed_sums_file_refuses_the_version_naming_it(base_fp32, tmp_path, caplog):
    root = tmp_path / "store"
    sums = AdapterManager(base_fp32, root).register_dir("acme", CASE).path / SUMS
    sums.write_bytes(b"\xff not sums\n")
    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.runtime.registry"):
        assert AdapterManager(base_fp32, root).versions() == []
    assert f"{sums}: not a SHA256SUMS file" in caplog.text and sums.read_bytes() == b"\xff not sums\n"


def test_a_version_an_older_server_wrote_loads_and_gets_its_sums_recorded(base_fp32, tmp_path):
    root = tmp_path / "store"
    stored = AdapterManager(base_fp32, root).register_dir("acme", CASE).path
    (stored / SUMS).unlink()  # as a store written before SHA256SUMS existed
    assert [v.name for v in AdapterManager(base_fp32, root).versions()] == ["acme"]
    files = {f: (stored / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)}
    assert (stored / SUMS).read_text() == _sums_text(files)  # recorded at that first load: checked from now on
    (stored / WEIGHTS_FILE).write_bytes(_another_valid_adapter(stored / WEIGHTS_FILE))
    assert AdapterManager(base_fp32, root).versions() == []


def test_a_disk_refusing_the_sums_of_an_older_version_still_serves_it(base_fp32, tmp_path, caplog):
    root = tmp_path / "store"
    stored = AdapterManager(base_fp32, root).register_dir("acme", CASE).path
    (stored / SUMS).unlink()

    def full(op):
        if op.kind == "create" and op.path.name == SUMS:
            raise OSError(errno.ENOSPC, "No space left on device")

    previous = durable.set_fault_hook(full)
    try:
        with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.store.sums"):
            assert [v.name for v in AdapterManager(base_fp32, root).versions()] == ["acme"]
    finally:
        durable.set_fault_hook(previous)
    assert "could not record the sha256" in caplog.text and not (stored / SUMS).exists()
    assert list((root / STAGING).iterdir()) == []


def test_a_sums_file_over_its_own_cap_is_refused_naming_that_cap_not_max_adapter_bytes(tmp_path):
    """The refusal said "over the server's --max-adapter-bytes 4096": a flag the operator had not set to that."""
    from nlora_serve.adapters.store.sums import MAX_SUMS_BYTES
    from nlora_serve.errors import AdapterError

    store = AdapterStore(tmp_path / "store")
    stored = store.write("acme", {CONFIG_FILE: b'{"r": 4}', WEIGHTS_FILE: bytes(range(64))})
    (stored.path / SUMS).write_bytes((stored.path / SUMS).read_bytes() + b"\n" * MAX_SUMS_BYTES)
    with pytest.raises(AdapterError, match=f"over the {MAX_SUMS_BYTES} bytes a SHA256SUMS may hold") as info:
        store.read_files(stored.path)
    assert "--max-adapter-bytes" not in str(info.value)


def test_sums_the_disk_refused_are_tried_and_warned_once_not_at_every_cold_load(tmp_path, caplog):
    """Each load of such a version (every cold load of it) waited for the store's write lock, wrote
    and fsynced the file again and logged the warning again."""
    store = AdapterStore(tmp_path / "store")
    files = {CONFIG_FILE: b'{"r": 4}', WEIGHTS_FILE: bytes(range(64))}
    stored = store.write("acme", files).path
    (stored / SUMS).unlink()
    tries = []

    def full(op):
        if op.kind == "create" and op.path.name == SUMS:
            tries.append(op.path)
            raise OSError(errno.ENOSPC, "No space left on device")

    previous = durable.set_fault_hook(full)
    try:
        with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.store.sums"):
            for _ in range(3):
                store.record_sums(stored, store.read_files(stored))
    finally:
        durable.set_fault_hook(previous)
    assert len(tries) == 1 and caplog.text.count("could not record the sha256") == 1
    assert not (stored / SUMS).exists()
    AdapterStore(tmp_path / "store").record_sums(stored, files)  # a restart tries again
    assert (stored / SUMS).read_text() == _sums_text(files)


def test_a_swap_linking_a_config_replaced_on_disk_is_refused_as_the_stores_fault_not_recorded(base_fp32, tmp_path):
    """A hot-swap hard-links the current version's config into the new version and its SHA256SUMS
    recorded the linked file's bytes as they were: a config replaced on disk since was recorded as
    what the store wrote, and the next start served it unchecked. Refused now, the store untouched,
    as INTERNAL / 500 ``adapter_load_failed`` (the store's fault, not the admin's payload's)."""
    import grpc

    from nlora_serve.adapters.nystrom import init_adapter
    from nlora_serve.adapters.save import write_adapter
    from nlora_serve.adapters.store.sums import StoredHashMismatch
    from nlora_serve.serving.status import http_status_of, status_of

    adapter = init_adapter(base_fp32, rank=4, targets=["q_proj"], layers=[0])
    root, tied = tmp_path / "store", write_adapter(adapter, tmp_path / "tied", tied_form=True)
    manager = AdapterManager(base_fp32, root)
    config = manager.register_dir("acme", tied).path / CONFIG_FILE
    expected = _sha(config.read_bytes())
    config.write_bytes(config.read_bytes() + b" ")  # still a valid config, not the bytes the store wrote
    before = _snapshot(root)
    payload = save({k: 2 * t for k, t in load((tied / WEIGHTS_FILE).read_bytes()).items()})  # its N only
    with pytest.raises(StoredHashMismatch, match=f"its stored file {config} has sha256 {_sha(config.read_bytes())}, "
                                                 f"but the store recorded sha256 {expected}") as info:
        manager.swap("acme", payload)
    assert _snapshot(root) == before and list((root / STAGING).iterdir()) == []
    assert status_of(info.value) == (grpc.StatusCode.INTERNAL, "adapter_load_failed")
    assert http_status_of(info.value) == (500, "adapter_load_failed")


def test_a_cold_load_refusing_changed_files_of_an_older_version_does_not_record_them(base_fp32, tmp_path):
    """An evicted version without sums (an older store whose record the disk refused at start) whose
    weights were replaced: the cold load recorded the replacement's sha256 before comparing the
    content hash, refused it, and left a SHA256SUMS that `sha256sum -c` passes and a restart trusts."""
    from nlora_serve.adapters.limits import AdapterLimits
    from nlora_serve.adapters.runtime.residency import AdapterLoadFailed

    manager = AdapterManager(base_fp32, tmp_path / "store", limits=AdapterLimits(max_loras=1))
    acme = manager.register_dir("acme", CASE)
    manager.register_dir("zeta", CASE.parent / "lora-rslora")
    manager.release(manager.acquire("zeta"))
    assert acme.adapter is None  # evicted: zeta holds the one slot
    (acme.path / SUMS).unlink()
    weights = acme.path / WEIGHTS_FILE
    weights.write_bytes(_another_valid_adapter(weights))
    with pytest.raises(AdapterLoadFailed):
        manager.acquire("acme")
    assert not (acme.path / SUMS).exists()


def test_loading_a_stored_versions_folder_by_path_checks_its_sums(base_fp32, tmp_path):
    """HTTP's /v1/load_lora_adapter registers the folder ``lora_path``: an operator's reload of an
    unloaded tenant from its stored folder read the files unchecked and recorded a replaced file's
    sha256 in the new version, served from then on; gRPC's LoadAdapter of the same version refused it."""
    from nlora_serve.adapters.store.sums import StoredHashMismatch

    root = tmp_path / "store"
    manager = AdapterManager(base_fp32, root)
    stored = manager.register_dir("acme", CASE)
    assert manager.register_dir("beta", stored.path).content_hash == stored.content_hash  # unchanged: loads
    weights = stored.path / WEIGHTS_FILE
    weights.write_bytes(_another_valid_adapter(weights))
    before = _snapshot(root)
    with pytest.raises(StoredHashMismatch, match=f"its stored file {weights} has sha256"):
        manager.register_dir("gamma", stored.path)
    assert _snapshot(root) == before and "gamma" not in [v.name for v in manager.versions()]
