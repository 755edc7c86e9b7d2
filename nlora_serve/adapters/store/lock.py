"""One process per adapter store: an exclusive ``flock`` on the store's root folder.

Two servers on one ``--adapter-dir`` (``make serve`` started twice) would each number versions
from their own view, prune versions the other still serves, and wipe the other's staging area at
start. The lock is taken on the root folder itself (no lock file in the store's listing); a store
opened again in the same process (a restart in tests, the serve command's early peek) shares it,
and it is released when the last :class:`~nlora_serve.adapters.store.AdapterStore` of that root in
this process is gone, or when the process exits (also on SIGKILL: the kernel drops flocks; a
forked child keeps none of it: :func:`_forget_after_fork`).
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from nlora_serve.errors import AdapterError


class StoreInUse(AdapterError):
    """Another process holds the store's lock (a server on that --adapter-dir)."""


_guard = threading.Lock()
_held: dict[Path, list[int]] = {}  # resolved root -> [open fd of the root holding the flock, stores using it]


def claim(owner: object, root: Path) -> tuple[bool, Callable[[], object]]:
    """Hold the store lock of ``root`` (resolved) for as long as ``owner`` lives. Returns whether
    this call took the flock (True: this process's first open store of ``root``; False: another
    store of this process holds it already), and a callable that lets go of ``owner``'s hold at
    once (a store that failed to open; its later collection then does nothing).

    Raises:
        StoreInUse: another process holds it (the message names the root and what to do).
    """
    with _guard:
        entry = _held.get(root)
        first = entry is None
        if first:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreInUse(f"adapter store {root} is in use by another process (a server on this "
                                   "--adapter-dir?); two processes on one store would overwrite and delete each "
                                   "other's versions: give each server its own --adapter-dir, or stop the other "
                                   "one first") from None
            entry = _held[root] = [fd, 0]
        entry[1] += 1
    # the entry itself, not the root: a store a forked child inherited lets go of nothing, even once
    # the child claims the root anew (a new entry, which that store's collection must not count down)
    return first, weakref.finalize(owner, _release, root, entry)


def _release(root: Path, entry: list[int]) -> None:
    with _guard:
        if _held.get(root) is not entry:  # a store a forked child inherited: the lock is the parent's
            return  # (_forget_after_fork)
        entry[1] -= 1
        if entry[1] == 0:
            os.close(entry[0])  # closing the last descriptor drops the flock
            del _held[root]


def _forget_after_fork() -> None:
    """In a forked child, the stores' locks stay the parent's: the child closes its copies of their
    descriptors and forgets them. A flock belongs to the open file, which fork shares: a child that
    outlived its parent (a multiprocessing worker, vLLM's engine core) kept the store locked, and
    the restarted server was refused it as "in use by another process". A store the child opens
    anew is another process's claim (refused while the parent holds the lock); the stores it
    inherited work on, holding no lock of their own."""
    global _guard
    _guard = threading.Lock()  # another thread of the parent may have held it at the fork
    for fd, _ in _held.values():
        os.close(fd)  # the parent's descriptor still holds the flock
    _held.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
