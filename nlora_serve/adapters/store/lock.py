"""One process per adapter store: an exclusive ``flock`` on the store's root folder.

Two servers on one ``--adapter-dir`` (``make serve`` started twice) would each number versions
from their own view, prune versions the other still serves, and wipe the other's staging area at
start. The lock is taken on the root folder itself (no lock file in the store's listing); a store
opened again in the same process (a restart in tests, the serve command's early peek) shares it,
and it is released when the last :class:`~nlora_serve.adapters.store.AdapterStore` of that root in
this process is gone, or when the process exits (also on SIGKILL: the kernel drops flocks).
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
    return first, weakref.finalize(owner, _release, root)


def _release(root: Path) -> None:
    with _guard:
        entry = _held[root]
        entry[1] -= 1
        if entry[1] == 0:
            os.close(entry[0])  # closing the last descriptor drops the flock
            del _held[root]
