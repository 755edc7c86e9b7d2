"""The store's durability order, checked on its recorded file operations (issue 16).

SIGKILL keeps the page cache, so a kill never tests an fsync. Here every store write path is
recorded (write, fsync of the file, fsync of the folder, rename, ...) and (1) the order is
asserted per path: a version's files and folder are fsynced before the rename that makes it
visible, and the rename (and a new name's entry in the root) is fsynced before the write is
acknowledged; (2) a replay drops every write not yet fsynced at each point of a run of all write
paths (tests/registry/disk_model.py) and reopens the store there: every name shows exactly its
last acknowledged state or the one in flight, and nothing half-written.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store import CONFIG_FILE, STAGING, UNLOADED, WEIGHTS_FILE, AdapterStore, content_hash
from nlora_serve.adapters.store.factors import write_factors
from nlora_serve.errors import AdapterError
from disk_model import DiskModel

CONFIG = b'{"r": 4}'


def _files(tag: int) -> dict[str, bytes]:
    return {CONFIG_FILE: CONFIG, WEIGHTS_FILE: bytes([tag]) * 64}


class Recorder:
    """A fault hook that records every FileOp, with ("ack", name, state) marks between them."""

    def __init__(self):
        self.ops: list = []

    def __call__(self, op) -> None:
        self.ops.append(op)

    def ack(self, name: str, state: str) -> None:
        self.ops.append(("ack", name, state))

    def begin(self, name: str, state: str) -> None:
        self.ops.append(("begin", name, state))


@pytest.fixture
def recorder():
    rec = Recorder()
    previous = durable.set_fault_hook(rec)
    yield rec
    durable.set_fault_hook(previous)


def _index(ops, kind: str, path: Path, target: Path | None = None) -> int:
    found = [i for i, op in enumerate(ops) if not isinstance(op, tuple) and op.kind == kind and op.path == path
             and (target is None or op.target == target)]
    assert found, f"no {kind} of {path}"
    return found[-1]


def _check_version_write(ops, root: Path, name: str, version: int, new_name: bool, linked=()) -> None:
    """The order one write() of ``name`` v``version`` must follow (ops: that call's only)."""
    final = root / name / f"{version:08d}"
    rename = next(i for i, op in enumerate(ops) if op.kind == "rename" and op.target == final)
    staged = ops[rename].path
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if fname in linked:
            assert _index(ops, "link", root / name / f"{version - 1:08d}" / fname, staged / fname) < rename
            continue
        create, write = _index(ops, "create", staged / fname), _index(ops, "write", staged / fname)
        assert create < write < _index(ops, "fsync_file", staged / fname) < rename, fname
    assert max(i for i, op in enumerate(ops) if op.path.parent == staged) < _index(ops, "fsync_dir", staged) < rename
    fsyncs = [i for i, op in enumerate(ops) if op.kind == "fsync_dir" and op.path == root / name]
    assert any(i > rename for i in fsyncs), "the rename is not fsynced before the acknowledgement"
    if new_name:
        assert _index(ops, "mkdir", root / name) < rename < _index(ops, "fsync_dir", root)


def _since(rec: Recorder, start: int) -> list:
    return [op for op in rec.ops[start:] if not isinstance(op, tuple)]


def test_every_write_path_follows_the_durable_order(tmp_path, recorder):
    store = AdapterStore(tmp_path)
    root = store.root
    start = len(recorder.ops)
    store.write("acme", _files(1))
    _check_version_write(_since(recorder, start), root, "acme", 1, new_name=True)
    start = len(recorder.ops)
    store.write("acme", _files(2))
    ops = _since(recorder, start)
    _check_version_write(ops, root, "acme", 2, new_name=False)
    assert not any(op.kind == "fsync_dir" and op.path == root for op in ops)  # not needed for an old name
    start = len(recorder.ops)  # a hot-swap: the config is a hard link to the previous version's
    previous_config = root / "acme" / "00000002" / CONFIG_FILE
    store.write("acme", {WEIGHTS_FILE: bytes([3]) * 64}, same_as={CONFIG_FILE: previous_config})
    _check_version_write(_since(recorder, start), root, "acme", 3, new_name=False, linked=(CONFIG_FILE,))
    start = len(recorder.ops)  # an unload: the marker is written, fsynced and its folder fsynced
    store.mark_unloaded("acme")
    ops = _since(recorder, start)
    marker = root / "acme" / UNLOADED
    assert _index(ops, "create", marker) < _index(ops, "write", marker) < _index(ops, "fsync_file", marker) \
        < _index(ops, "fsync_dir", root / "acme")
    start = len(recorder.ops)  # a registration after the unload: the marker goes only after the rename is durable
    store.write("acme", _files(4))
    ops = _since(recorder, start)
    _check_version_write(ops, root, "acme", 4, new_name=False)
    unlink = _index(ops, "unlink", marker)
    rename = next(i for i, op in enumerate(ops) if op.kind == "rename")
    assert rename < min(i for i, op in enumerate(ops) if op.kind == "fsync_dir" and op.path == root / "acme") < unlink
    assert unlink < _index(ops, "fsync_dir", root / "acme")
    start = len(recorder.ops)  # removing an old version: out of the adapter's folder in one rename
    store.remove_version("acme", 1)
    store.wait_deleted()
    ops = _since(recorder, start)
    assert [op.kind for op in ops] == ["mkdir", "rename"] and ops[1].path == root / "acme" / "00000001"
    assert ops[1].target.is_relative_to(root / STAGING)


def _run_all_paths(store: AdapterStore, rec: Recorder) -> None:
    """Every write path once, acknowledged states marked: (name, content hash or "unloaded")."""
    root = store.root

    def write(name, files, same_as=None):
        state = content_hash({**files, **{f: p.read_bytes() for f, p in (same_as or {}).items()}})
        rec.begin(name, state)
        store.write(name, files, same_as)
        rec.ack(name, state)

    write("acme", _files(1))
    write("acme", _files(2))
    write("beta", _files(5))
    write("acme", {WEIGHTS_FILE: bytes([3]) * 64}, {CONFIG_FILE: root / "acme" / "00000002" / CONFIG_FILE})
    rec.begin("beta", "unloaded")
    store.mark_unloaded("beta")
    rec.ack("beta", "unloaded")
    write("beta", _files(6))
    store.remove_version("acme", 1)
    store.wait_deleted()


def _observed(store: AdapterStore, name: str) -> str:
    if name not in store.names():
        return "unloaded"
    return content_hash(store.read_files(store.latest(name).path))


def test_a_power_loss_at_any_point_leaves_a_consistent_store(tmp_path, recorder):
    root = (tmp_path / "store").resolve()
    AdapterStore(root)  # the empty store, durable before the run
    model_start = DiskModel(root)
    _run_all_paths(AdapterStore(root), recorder)
    written = {s for op in recorder.ops if isinstance(op, tuple) for s in [op[2]]}
    ops = recorder.ops
    checked = 0
    for point in range(len(ops) + 1):
        model = _replay(model_start, ops[:point])
        target = tmp_path / f"crash{point}"
        model.after_power_loss(target)
        store = AdapterStore(target)  # the restart: discards the staging area
        acked = {name: "unloaded" for name in ("acme", "beta")}
        in_flight: dict[str, str] = {}
        for op in ops[:point]:
            if isinstance(op, tuple):
                kind, name, state = op
                if kind == "begin":
                    in_flight[name] = state
                else:
                    acked[name] = state
                    in_flight.pop(name, None)
        for name in ("acme", "beta"):
            seen = _observed(store, name)
            last_op = ops[point - 1] if point else None
            assert seen in {acked[name], in_flight.get(name, acked[name])}, (point, name, last_op)
            for version in store.versions(name):  # nothing half-written anywhere
                files = store.read_files(store.get(name, version).path)
                assert set(files) == {CONFIG_FILE, WEIGHTS_FILE} and content_hash(files) in written, (point, name)
        assert {p.name for p in target.iterdir()} <= {"acme", "beta", STAGING}
        assert list((target / STAGING).iterdir()) == []  # no temp files pile up across restarts
        shutil.rmtree(target)
        checked += 1
    assert checked == len(ops) + 1 > 60


def _replay(start: DiskModel, ops) -> DiskModel:
    model = copy.deepcopy(start)
    for op in ops:
        if not isinstance(op, tuple):
            model.apply(op)
    return model


def test_family_factors_are_whole_or_absent_at_any_power_loss_and_there_once_acknowledged(tmp_path, recorder):
    root = (tmp_path / "store").resolve()
    key, data = "ab" * 32, bytes(range(256)) * 4
    leftover = root / "_families" / key  # what a crash of the older, non-atomic factors write left
    leftover.mkdir(parents=True)
    (leftover / ".family.safetensors.tmp1234").write_bytes(b"half")
    member = root / "acme" / "00000001"  # the member whose config names them: kept at each open (sweep.py)
    member.mkdir(parents=True)
    (member / "adapter_config.json").write_text('{"r": 4, "nlora_serve": {"family": "%s"}}' % key)
    AdapterStore(root)
    model_start = DiskModel(root)
    path = write_factors(AdapterStore(root), "acme", key, lambda: data)
    assert path == leftover / "family.safetensors" and path.read_bytes() == data
    assert [p.name for p in leftover.iterdir()] == ["family.safetensors"]
    ops = recorder.ops
    for point in range(len(ops) + 1):
        target = tmp_path / f"crash{point}"
        _replay(model_start, ops[:point]).after_power_loss(target)
        AdapterStore(target)  # the restart: discards the staging area
        factors = target / "_families" / key / "family.safetensors"
        assert not factors.exists() or factors.read_bytes() == data, point
        assert list((target / STAGING).iterdir()) == []
        shutil.rmtree(target)
    target = tmp_path / "acknowledged"
    _replay(model_start, ops).after_power_loss(target)
    assert (target / "_families" / key / "family.safetensors").read_bytes() == data
    assert write_factors(AdapterStore(root), "acme", key, lambda: b"other") == path and path.read_bytes() == data  # once


def test_family_factors_are_not_written_through_a_linked_families_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = AdapterStore(tmp_path / "store")
    (store.root / "_families").symlink_to(outside)
    with pytest.raises(AdapterError, match="_families is a link or a file, not a folder"):
        write_factors(store, "acme", "ab" * 32, lambda: b"data")
    assert list(outside.iterdir()) == []
