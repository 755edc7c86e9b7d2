"""The adapter store in a forked child (store/lock.py's and store/reads.py's after-fork hooks), past
the cases test_store_batch.py covers: a child's own lock claim, and a store lock a parent thread held
at the fork. No model; each case forks one child (~0.05 s)."""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import threading
import time

from nlora_serve.adapters.store import AdapterStore

FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"weights"}


def _exit_code(pid: int, within_s: float = 10.0) -> int:
    """The child's exit code; AssertionError (the child killed) where it has not ended within ``within_s``."""
    deadline = time.monotonic() + within_s
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the forked child hung (killed after {within_s:g} s)")
        time.sleep(0.005)
    return os.waitstatus_to_exitcode(done[1])


def _flock_free(root) -> bool:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_childs_inherited_store_going_leaves_the_childs_own_claim_held(tmp_path):
    # the child's copy of its parent's store kept its finalizer, which let go of "the root's claim":
    # once the parent had let go and the child claimed the root itself, that copy's collection
    # released the child's own claim (count 1 -> 0, its descriptor closed) while its store still lived
    root = tmp_path / "store"
    inherited = AdapterStore(root)
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.close(go_write)
            os.read(go_read, 1)  # the parent has let go of the store
            own = AdapterStore(root)  # the child's own claim of the root
            del inherited
            gc.collect()
            code = 1 if _flock_free(root) else 0  # granted to another descriptor: the claim was let go
            own.wait_deleted()  # (it lives until here)
        finally:
            os._exit(code)
    os.close(go_read)
    del inherited
    gc.collect()
    os.write(go_write, b"g")
    os.close(go_write)
    assert _exit_code(pid) == 0, "the child's own store lost its lock when its inherited copy went"


def test_a_child_forked_while_a_parent_thread_writes_can_write_with_the_store(tmp_path):
    # fork copies the store's write lock as it is: held by a parent thread in a write at the fork
    # (an upload beside a multiprocessing fork), it stayed held in the child, whose first write hung
    store = AdapterStore(tmp_path / "store")
    holding, release = threading.Event(), threading.Event()

    def write_in_progress():
        with store.write_lock:
            holding.set()
            release.wait()

    thread = threading.Thread(target=write_in_progress)
    thread.start()
    holding.wait()
    try:
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                store.write("acme", FILES)
                code = 0
            finally:
                os._exit(code)
    finally:
        release.set()
        thread.join()
    assert _exit_code(pid, within_s=5.0) == 0
