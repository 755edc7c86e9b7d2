"""A start's batch on the adapter store (store/batch.py) and the base-model record's edges
(store/base_record.py), at the store's level: no model, no server (helper-150's review of h141's fix).

The failed ``serve`` start itself: tests/grpc/test_grpc_serve_errors.py; the manager's view:
test_store_base_model.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from nlora_serve.adapters.store import STAGING, AdapterStore, durable
from nlora_serve.adapters.store.base_record import BASE_FILE, BaseIdentity, check_base, read_record, write_record
from nlora_serve.errors import AdapterError

FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}


def _in_thread(fn) -> None:
    """Run ``fn`` in another thread (an admin call's), re-raising what it raised."""
    raised: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if raised:
        raise raised[0]


def test_another_threads_writes_and_removals_during_a_start_batch_are_not_the_starts(tmp_path):
    # the batch was the store's: an admin upload between server.start() and the commit was
    # recorded and undone by an abort (an acknowledged upload lost), and its removals deferred
    store = AdapterStore(tmp_path / "store")
    store.write("acme", FILES)  # v1
    store.write("acme", FILES)  # v2
    store.begin_batch()
    store.write("start", FILES)  # the start's own: undone
    _in_thread(lambda: store.write("upload", FILES))  # an admin's, meanwhile: stays
    _in_thread(lambda: store.write("acme", FILES))  # v3, and its prune of v1: happens now
    _in_thread(lambda: store.remove_version("acme", 1))
    assert store.versions("acme") == [2, 3]
    store.abort_batch()
    assert store.versions("start") == [] and not (store.root / "start").exists()
    assert store.versions("upload") == [1] and store.versions("acme") == [2, 3]


def test_an_abort_after_another_thread_superseded_the_starts_version_keeps_the_new_one(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.begin_batch()
    store.write("acme", FILES)  # v1, the start's, in a folder it made
    _in_thread(lambda: store.write("acme", FILES))  # v2, an admin's hot-swap
    _in_thread(lambda: store.remove_version("acme", 1))  # its prune of the start's v1
    store.abort_batch()  # v1 gone already; the folder holds v2: kept
    assert store.versions("acme") == [2]


def test_a_second_batch_on_one_store_is_refused_and_the_first_stays_open(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.begin_batch()
    store.write("acme", FILES)
    with pytest.raises(RuntimeError, match=rf"^adapter store {store.root}: a start batch is open on it already"):
        store.begin_batch()
    store.abort_batch()  # the first batch's write is still recorded: undone
    assert store.versions("acme") == []


def test_a_subfolder_of_a_name_that_is_no_version_holds_no_adapter(tmp_path):
    # _holds_adapters counted any subfolder: a store of another model whose only "adapter" was a
    # stray folder (a copy's notes/, a 3/) was refused as holding adapters
    store = AdapterStore(tmp_path / "store")
    write_record(store.root, BaseIdentity("f" * 64, "/models/Other-1B"))
    for stray in ("notes", "3", "00000000", "٣٣٣٣٣٣٣٣"):
        os.makedirs(store.root / "acme" / stray)
    mine = BaseIdentity("a" * 64, "/models/Mine-1B")
    check_base(store, mine)  # nothing served: taken for this model
    assert store.base_pending == mine
    os.makedirs(store.root / "acme" / "00000001")
    store.base_pending = None
    with pytest.raises(AdapterError, match=r"is for base model /models/Other-1B"):
        check_base(store, mine)


@pytest.mark.parametrize("kind", ["folder", "link", "oversized"])
def test_a_record_that_is_not_a_file_or_too_large_is_refused_naming_its_full_path(tmp_path, kind):
    # the messages named "adapter store entry .base_model.json" / "adapter store folder .": not the store
    root = tmp_path / "store"
    root.mkdir()
    record = root / BASE_FILE
    if kind == "folder":
        record.mkdir()
    elif kind == "link":
        (tmp_path / "elsewhere.json").write_text("{}")
        record.symlink_to(tmp_path / "elsewhere.json")
    else:
        record.write_bytes(b" " * (1 << 17))
    with pytest.raises(AdapterError) as err:
        read_record(root)
    shown = str(record) if kind != "oversized" else f"adapter store folder {root}: {BASE_FILE} is"
    assert shown in str(err.value), str(err.value)
    assert "folder .:" not in str(err.value) and f"entry {BASE_FILE}" not in str(err.value)
    assert record.is_symlink() if kind == "link" else record.exists()  # left as it was


def _tree(root: Path) -> dict[str, bytes | None]:
    """The store outside its staging area: a file's bytes, None for a folder, by path."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if p.relative_to(root).parts[0] != STAGING}


def _wait(pid: int, seconds: float = 20.0) -> int:
    """The signal that ended child ``pid`` (0: it exited); a child still running after
    ``seconds`` is killed and the test fails."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked start hung")


def _start(root: Path) -> None:
    """A start's registrations on the store at ``root``: acme v2 (its v1's removal deferred), a new
    name, and a family's factors, then the commit."""
    store = AdapterStore(root)
    store.begin_batch()
    store.write("acme", {**FILES, "adapter_model.safetensors": b"new weights"})
    store.remove_version("acme", 1)  # as the registry prunes the version v2 replaced
    # a member of the family whose factors follow (its config names them: kept at the next open, sweep.py)
    store.write("fresh", {**FILES, "adapter_config.json": b'{"r": 4, "nlora_serve": {"family": "' + b"ab" * 32 + b'"}}'})
    from nlora_serve.adapters.store.factors import write_factors
    write_factors(store, "fresh", "ab" * 32, lambda: b"factors")
    store.commit_batch()
    store.wait_deleted()


def test_a_start_killed_at_any_store_operation_is_undone_at_the_next_open(tmp_path):
    # SIGKILL mid-start kept the versions it wrote (the undo lived in the killed process): the next
    # start served them and pruned the ones they replaced. Now the next open rolls back whatever the
    # start's journal lists: the store is as before the start, or as after its commit. A fork per
    # file operation of the start (as tests/grpc/test_grpc_crash.py kills at a store operation,
    # without a server: ~5 ms a kill)
    def fresh(root: Path) -> dict[str, bytes | None]:
        store = AdapterStore(root)
        store.write("acme", FILES)
        del store
        return _tree(root)

    ops: list[durable.FileOp] = []
    before = fresh(tmp_path / "counted")
    previous = durable.set_fault_hook(ops.append)
    try:
        _start(tmp_path / "counted")
    finally:
        durable.set_fault_hook(previous)
    after = _tree(tmp_path / "counted")
    pruned_later = {**after, **{k: v for k, v in before.items() if k.startswith("acme/00000001")}}
    assert len(ops) > 20 and before != after and ".start_batch.json" not in after  # the commit removed it
    outcomes = set()
    for kill_at in range(1, len(ops) + 1):
        root = tmp_path / f"k{kill_at}"
        assert fresh(root) == before
        pid = os.fork()
        if pid == 0:  # the start, killed just before its kill_at-th store file operation
            seen = [0]

            def kill(op, seen=seen, kill_at=kill_at):
                seen[0] += 1
                if seen[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            durable.set_fault_hook(kill)
            try:
                _start(root)
            finally:
                os._exit(3)  # not killed: the test fails below
        assert _wait(pid) == signal.SIGKILL, f"not killed at {ops[kill_at - 1]}"
        AdapterStore(root).wait_deleted()  # the next open: rolls a journal back
        got = _tree(root)
        match = [name for ref, name in ((before, "before"), (after, "after"), (pruned_later, "pruned later"))
                 if got == ref]
        assert match, f"killed before {ops[kill_at - 1]}: the store is {sorted(got)}"
        outcomes.add(match[0])
        assert list((root / STAGING).iterdir()) == []
    assert outcomes == {"before", "pruned later"}  # (the last operation is v1's removal: "after" needs no kill)


def test_a_forked_child_writes_and_removes_with_the_store_its_parent_used(tmp_path):
    # the parent's fsync pool and deleter had counted their threads idle, and fork copies no
    # thread: the child's first write (fsync_together) and removal (wait_deleted) queued their work
    # to nobody and hung for ever (a multiprocessing fork after the store was used)
    store = AdapterStore(tmp_path / "store")
    store.write("acme", FILES)
    store.write("acme", FILES)  # the fsync pool's threads, started and idle
    store.remove_version("acme", 1)
    store.wait_deleted()  # the deleter's thread too
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            store.write("acme", FILES)
            store.remove_version("acme", 2)
            store.wait_deleted()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10.0
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.005)
    if not done[0]:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung on the store")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert store.versions("acme") == [3] and not (tmp_path / "store" / "acme" / "00000002").exists()


@pytest.mark.parametrize("body", ['{"entries": [{"written": "../outside/00000001"}]}',
                                  '{"entries": [{"written": "acme/notes"}]}', '{"entries": 7}', "not json"])
def test_a_journal_naming_anything_but_a_starts_folders_is_refused_and_nothing_is_touched(tmp_path, body):
    from nlora_serve.adapters.store.journal import JOURNAL_FILE

    root = tmp_path / "store"
    AdapterStore(root).write("acme", FILES)
    (root / "acme" / "notes").mkdir()
    (tmp_path / "outside" / "00000001").mkdir(parents=True)
    (root / JOURNAL_FILE).write_text(body)
    before = _tree(root)
    with pytest.raises(AdapterError, match=rf"^adapter store {root}: its start journal {root / JOURNAL_FILE} cannot"):
        AdapterStore(root)
    assert _tree(root) == before and (tmp_path / "outside" / "00000001").is_dir()


def test_a_retry_while_the_refused_open_is_kept_is_refused_too_and_later_opens_never_undo_a_live_start(tmp_path):
    # A journal is undone by a process's first open of the store only: a later open in the process
    # sees no journal but its own (the flock excludes every other process since that first open),
    # and must leave it: a start still open, or one committed whose journal the disk kept (the
    # versions it serves). But a first open that refused the journal held the lock until the refused
    # store was collected: a retry meanwhile (the error kept, as here) opened past the journal,
    # unchecked, and a start's own journal would then have replaced it.
    from nlora_serve.adapters.store.journal import JOURNAL_FILE

    root = tmp_path / "store"
    AdapterStore(root).write("acme", FILES)
    (root / JOURNAL_FILE).write_text("not json")
    with pytest.raises(AdapterError, match="its start journal") as refused:
        AdapterStore(root)
    with pytest.raises(AdapterError, match="its start journal"):
        AdapterStore(root)  # the retry, while the first open's store lives on in its traceback
    assert refused.value is not None
    (root / JOURNAL_FILE).unlink()
    store = AdapterStore(root)
    store.begin_batch()
    store.write("acme", FILES)  # the start's v2, journaled
    again = AdapterStore(root)  # a later open in this process, the start still open: its write stays
    assert (root / JOURNAL_FILE).exists() and again.versions("acme") == [1, 2]
    store.commit_batch()
    assert again.versions("acme") == [1, 2] and not (root / JOURNAL_FILE).exists()


def test_a_forked_child_that_outlives_its_parents_store_does_not_keep_the_store_locked(tmp_path):
    # fork shares the open file that holds the store's flock: a child still running (a
    # multiprocessing worker, vLLM's engine core) kept the store locked after its parent let go
    # or died, and the restarted server was refused the store as "in use by another process"
    import fcntl
    import gc

    root = tmp_path / "store"
    store = AdapterStore(root)
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(write_end)
            os.write(ready_write, b"r")  # fork has returned here: the after-fork hooks have run
            os.read(read_end, 1)  # runs on until the parent closes its end
        finally:
            os._exit(0)
    os.close(read_end)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"r"  # else the claim below could win the race with the hook
        os.close(ready_read)
        del store
        gc.collect()  # the parent lets go of the store
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the next server's claim (store/lock.py)
        finally:
            os.close(fd)
    finally:
        os.close(write_end)  # the child's read ends: it exits
        os.waitpid(pid, 0)
