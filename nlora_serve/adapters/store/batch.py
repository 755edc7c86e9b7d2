"""A start's writes to the adapter store, kept undoable until the start succeeds (``serve``).

A ``serve`` start registers its ``--adapter`` folders and ``--example-tenants`` into the store one
version at a time, and each registration prunes the name's older versions. A start that failed
half-way (an ``--adapter`` folder made for another base model: "layer 10 is out of range") left
the versions written before the failure in the store, and had deleted the versions they replaced:
the next start served those, or warned about them and wrote yet more (h141). Between
:meth:`~nlora_serve.adapters.store.AdapterStore.begin_batch` and its commit, the store records
what it writes (versions, a family's shared factors, the folders they created) and defers every
removal; :meth:`~nlora_serve.adapters.store.AdapterStore.abort_batch` takes the writes back out
(each one leaves by one rename, durably) and forgets the removals, so the store is as before.
A batch is the starting thread's only: what any other thread writes or removes meanwhile (an
admin upload or hot-swap arriving once the servers are up, before the commit) is not recorded,
not deferred and never undone; the store holds one batch at a time (a second begin raises).
A start killed before either (SIGKILL, a power cut) is undone at the next open of the store from
the batch's journal on disk (journal.py), written before each of its writes is made.
``serve`` commits only once its servers are bound and started (:class:`OpenBatch`, threaded from
``build`` through ``run_serve``): a start refused later (a port taken) leaves the store untouched too.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.journal import Journal

if TYPE_CHECKING:
    from nlora_serve.adapters.store.writes import StoreWrites

log = logging.getLogger("nlora_serve.adapters.store")


@dataclass
class StartBatch:
    """What one start wrote to the store and what it would have removed, in order: the writes and
    removals of thread ``thread`` (``threading.get_ident()``, the one that began it) only."""

    thread: int
    journal: Journal | None = None  # on disk while the batch has written (journal.py); None: recovery's own
    written: list[Path] = field(default_factory=list)  # version folders and family folders, as written
    created: list[Path] = field(default_factory=list)  # folders made for them (a new name's, _families)
    removals: list[tuple[str, int]] = field(default_factory=list)  # (name, version) to remove at commit

    def announce(self, path: Path, created: Path | None = None) -> None:
        """Journal ``path`` (and the folder ``created`` for it) durably before it is made, so that a
        start killed after making it is undone at the next open (journal.py).

        Raises:
            OSError: the disk refused the journal: the caller makes nothing.
        """
        if self.journal is not None:
            self.journal.announce(path, created)

    def wrote(self, path: Path, created: Path | None = None) -> None:
        """Record a folder renamed into place by the start (and the folder made for it, if any)."""
        self.written.append(Path(path))
        if created is not None:
            self.created.append(Path(created))

    def undo(self, root: Path, staging: Path) -> None:
        """Take every recorded write back out of the store under ``root``, newest first: each
        folder leaves by one rename into ``staging`` (then deleted), the folders made for them are
        removed once empty, and each parent is fsynced, so a crash after this does not bring a
        write back; only then are the files deleted (deleted first, a crash could keep their
        unlinks and lose the rename: the name's newest version back, emptied, and not served).
        Best effort: what cannot be undone is logged (naming it), never raised."""
        parents: set[Path] = set()
        trashes: list[Path] = []
        for path in reversed(self.written):
            try:
                trash = durable.make_temp_dir(staging, "undone.")
                trashes.append(trash)
                durable.rename(path, trash / "v")
                parents.add(path.parent)
            except FileNotFoundError:  # removed since: another thread's write superseded it
                log.info("a failed start's write %s is gone already (superseded since)", path)
            except OSError as exc:
                log.error("a failed start could not take back %s (%s): remove that folder by hand", path, exc)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
                parents.add(folder.parent)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):  # another thread's version is there
                    continue
                log.error("a failed start could not remove the folder it made, %s (%s)", folder, exc)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # children first
            try:
                if os.path.isdir(parent):
                    durable.fsync_dir(parent)
            except OSError as exc:
                log.warning("could not fsync %s after taking a failed start's writes back (%s)", parent, exc)
        for trash in trashes:  # the staging area: whatever a crash leaves here is discarded at the next start
            shutil.rmtree(trash, ignore_errors=True)
        self.written.clear()
        self.created.clear()
        self.removals.clear()


class OpenBatch:
    """A start's batch, open on ``store`` from construction until :meth:`commit` or :meth:`abort`,
    whichever comes first (the other is then a no-op). As a context manager: committed when its
    block ends, aborted when it raises."""

    def __init__(self, store: StoreWrites) -> None:
        self._store = store
        store.begin_batch()
        self._open = True

    def commit(self) -> None:
        """The start succeeded: the deferred removals happen and the base model is recorded
        (:meth:`~nlora_serve.adapters.store.AdapterStore.commit_batch`).

        Raises:
            StoreWriteError: the disk refused the base-model record (the versions stay written).
        """
        if self._open:
            self._open = False
            self._store.commit_batch()

    def abort(self) -> None:
        """The start failed: its writes are taken back out, its removals never happen."""
        if self._open:
            self._open = False
            self._store.abort_batch()

    def __enter__(self) -> OpenBatch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
