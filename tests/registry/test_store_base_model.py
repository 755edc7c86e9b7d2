"""One store per base model, and a start's writes undone together should it fail (h141; the
failed ``serve`` start itself: tests/grpc/test_grpc_serve_errors.py).

h141: ``serve --model OTHER`` on ``make serve``'s store failed at start ("layer 10 is out of range",
the default model's ``--adapter lower``), yet had written tenant-000..002 as new versions for
OTHER and pruned the default model's; the next default start warned 3x and wrote them again.
The other model here is the default one under another fingerprint and folder (all the store
check reads); the expected bytes are the store's own, read before the start.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.store import AdapterStore
from nlora_serve.adapters.store.base_record import BASE_FILE
from nlora_serve.errors import AdapterError

ROOT = Path(__file__).resolve().parents[2]
LOWER = ROOT / "examples" / "tenants" / "lower"  # a tied tenant of the default model: its config names the base
PEFT = ROOT / "tests" / "data" / "cases" / "lora-layers-subset"  # a PEFT LoRA: its config names no base


def _other(base):
    """The loaded default model as another base model would look to the store."""
    return dataclasses.replace(base, fingerprint="f" * 64, path=Path("/models/Other-1B"))


def _files(root: Path) -> dict[str, bytes | None]:
    """Every entry under the store, staging area included, by path: a file's bytes, None for a folder."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_a_store_of_one_base_model_is_refused_under_another_naming_both(base_fp32, tmp_path):
    root = tmp_path / "store"
    manager = AdapterManager(base_fp32, root)
    manager.register_dir("lora", PEFT)  # the first version written records the model
    assert json.loads((root / BASE_FILE).read_text())["fingerprint"] == base_fp32.fingerprint
    del manager
    before = _files(root)
    with pytest.raises(AdapterError) as err:
        AdapterManager(_other(base_fp32), root)
    assert str(err.value) == (
        f"adapter store {root} is for base model {base_fp32.path} (fingerprint {base_fp32.fingerprint[:16]}…), "
        f"not /models/Other-1B (fingerprint ffffffffffffffff…): adapters of one base model do not fit another: "
        "give this model a store of its own (--adapter-dir ANOTHER_DIR), or serve the store's model on it")
    assert _files(root) == before  # nothing written, nothing pruned
    assert [v.name for v in AdapterManager(base_fp32, root).versions()] == ["lora"]  # its own model serves on


def test_a_store_that_holds_no_adapter_takes_another_model(base_fp32, tmp_path):
    root = tmp_path / "store"
    AdapterManager(base_fp32, root).registry.store.record_base()  # as a start on it commits
    assert (root / BASE_FILE).is_file()
    other = AdapterManager(_other(base_fp32), root)  # empty: no refusal
    other.register_dir("lora", PEFT)
    assert json.loads((root / BASE_FILE).read_text())["fingerprint"] == "f" * 64


def test_an_old_store_without_a_record_serves_and_is_refused_where_its_configs_name_another_base(base_fp32, tmp_path):
    root = tmp_path / "store"
    old = AdapterStore(root)  # as an older nlora-serve wrote it: versions, no record
    old.write("lower", {f.name: f.read_bytes() for f in LOWER.iterdir()})
    del old
    before = _files(root)
    with pytest.raises(AdapterError, match=rf"^adapter store {root} holds adapters made for another base model "
                                           rf"\(fingerprint {base_fp32.fingerprint[:16]}…, in the configs of lower\), "
                                           r"not /models/Other-1B \(fingerprint ffffffffffffffff…\)"):
        AdapterManager(_other(base_fp32), root)
    assert _files(root) == before
    manager = AdapterManager(base_fp32, root)  # its own model: served as before, adopted at the first write
    assert [v.name for v in manager.versions()] == ["lower"] and not (root / BASE_FILE).exists()
    manager.register_dir("lora", PEFT)
    assert json.loads((root / BASE_FILE).read_text())["fingerprint"] == base_fp32.fingerprint


def test_an_old_store_none_of_whose_adapters_loads_is_not_recorded_as_this_models(base_fp32, tmp_path, caplog):
    # its PEFT LoRAs name no base: recording this model would refuse their own model later
    root = tmp_path / "store"
    old = AdapterStore(root)
    old.write("theirs", {"adapter_config.json": (PEFT / "adapter_config.json").read_bytes(),
                         "adapter_model.safetensors": b"not this model's weights"})
    del old
    manager = AdapterManager(base_fp32, root)
    assert manager.versions() == []
    manager.register_dir("lora", PEFT)
    assert not (root / BASE_FILE).exists()
    assert "none of its adapters loads on" in caplog.text


def test_a_start_batch_that_fails_takes_its_writes_back_and_prunes_nothing(base_fp32, tmp_path):
    root = tmp_path / "store"
    manager = AdapterManager(base_fp32, root)
    manager.register_dir("acme", PEFT)
    before = _files(root)
    with pytest.raises(RuntimeError), manager.start_batch():
        manager.register_dir("acme", LOWER)  # v2: its v1 pruned (deferred)
        manager.register_dir("fresh", LOWER)  # a new name's folder
        raise RuntimeError("a later step of the start failed")
    assert _files(root) == before
    with manager.start_batch():  # the same, committed: v1 pruned now
        manager.register_dir("acme", LOWER)
    manager.registry.store.wait_deleted()
    assert manager.registry.store.versions("acme") == [3]


def _unreadable(monkeypatch, folder: Path) -> None:
    """``os.scandir`` of ``folder`` fails with EACCES (as for a non-root server on another user's 0700
    folder; the tests may run as root, where chmod does not refuse)."""
    import os

    real = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and Path(os.fsdecode(path)) == folder:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_name_folder_is_skipped_by_the_base_check_as_by_the_scan(base_fp32, tmp_path, monkeypatch):
    # the registry's scan skips such a folder with a warning (reads.py: "EACCES, EIO; not a crash of
    # the start"); the base check read it unguarded and the start died with a bare PermissionError
    root = tmp_path / "store"
    old = AdapterStore(root)  # an older nlora-serve's store: no record, so the configs are read
    files = {name: (PEFT / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    old.write("lora", files)
    old.write("locked", files)
    del old
    _unreadable(monkeypatch, root / "locked")
    assert [v.name for v in AdapterManager(base_fp32, root).versions()] == ["lora"]
    # a record of another model: a folder it cannot read may hold adapters, so it is refused, clearly
    (root / "lora" / "00000001").rename(tmp_path / "moved")
    from nlora_serve.adapters.store.base_record import BaseIdentity, write_record
    write_record(root, BaseIdentity("f" * 64, "/models/Other-1B"))
    with pytest.raises(AdapterError, match=r"is for base model /models/Other-1B"):
        AdapterManager(base_fp32, root)


def test_a_failed_start_deletes_the_files_it_takes_back_only_once_their_renames_are_durable(base_fp32, tmp_path,
                                                                                           monkeypatch):
    # rename, rmtree, then fsync of the parent: a crash in between could keep the unlinks of the
    # files and lose the rename (POSIX orders neither), bringing back the newest version of a name,
    # emptied: the next start would skip it ("not served") rather than serve its older version
    from nlora_serve.adapters.store import batch as batch_module, durable

    root = tmp_path / "store"
    manager = AdapterManager(base_fp32, root)
    manager.register_dir("acme", PEFT)
    ops: list[tuple[str, str]] = []
    real_rmtree = batch_module.shutil.rmtree
    monkeypatch.setattr(batch_module.shutil, "rmtree", lambda path, **kw: (ops.append(("rmtree", str(path))),
                                                                          real_rmtree(path, **kw)))
    with pytest.raises(RuntimeError), manager.start_batch():
        manager.register_dir("acme", LOWER)
        previous = durable.set_fault_hook(lambda op: ops.append((op.kind, str(op.path))))
        raise RuntimeError("a later step failed")
    durable.set_fault_hook(previous)
    kinds = [kind for kind, _ in ops]
    assert ("fsync_dir", str(root / "acme")) in ops and "rmtree" in kinds
    assert kinds.index("rmtree") > ops.index(("fsync_dir", str(root / "acme")))
    assert manager.registry.store.versions("acme") == [1]


@pytest.mark.parametrize("body", ['{"fingerprint": null}', '{"fingerprint": 7}', '{"fingerprint": ["a"]}',
                                  '{"fingerprint": "abc"}', '{"fingerprint": "' + "f" * 64 + '", "model": {}}'])
def test_a_record_whose_fields_are_not_a_records_is_refused_as_not_a_record(tmp_path, body):
    # str() of anything was taken: null read as the fingerprint "None", and a store holding adapters
    # was then refused as "for base model ? (fingerprint None…)"
    from nlora_serve.adapters.store.base_record import read_record

    (tmp_path / BASE_FILE).write_text(body)
    with pytest.raises(AdapterError, match=rf"^adapter store {tmp_path}: {BASE_FILE} is not a base-model record"):
        read_record(tmp_path)
