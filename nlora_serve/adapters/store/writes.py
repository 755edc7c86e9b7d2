"""The adapter store's writes: new versions, unload records, removals, SHA256SUMS of old versions.

A version becomes visible only by ``rename`` of a fully written and fsynced folder, so a crash at
any point leaves either the old state or the new one, never a half-written adapter (DESIGN §3).
A version written as a hot-swap shares the unchanged config with the version before it (a hard
link to a file already on disk). Its fsyncs are issued together where no order is needed
(durable.fsync_together), so it waits for two journal commits: one for the new weights, their
SHA256SUMS and the staged folder, one for the adapter's folder after the rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from nlora_serve.adapters.file_read import ALLOWED_FILES
from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.base_record import write_record
from nlora_serve.adapters.store.settings import write_keep_versions
from nlora_serve.adapters.store.batch import StartBatch
from nlora_serve.adapters.store.journal import Journal
from nlora_serve.adapters.store.durable import StoreWriteError, fsync_dir, raise_if_disk_error, write_synced
from nlora_serve.adapters.names import check_no_case_twin
from nlora_serve.adapters.store.layout import STAGING, UNLOADED, StoredVersion
from nlora_serve.adapters.store.sums import SUMS_FILE, check_linked, record, sums_bytes
from nlora_serve.errors import AdapterError

log = logging.getLogger("nlora_serve.adapters.store")  # the store's records keep the logger name they had


class StoreWrites:
    """The writing half of :class:`~nlora_serve.adapters.store.AdapterStore` (a mixin).

    It uses the store's ``root``, ``max_bytes``, ``write_lock`` (serialises version allocation and
    renames), ``adapter_dir``, ``versions``, ``note_version``, ``highest_version`` and
    ``record_base``, the deleter thread ``_deleter``, the set ``_unrecorded`` and the start batch
    ``_batch`` (None outside one); the store owns all of these.
    """

    def record_sums(self, path: Path, files: dict[str, bytes]) -> None:
        """Record the sha256 of ``files`` (all of version folder ``path``'s, read through
        :meth:`read_files` and validated) in its SHA256SUMS where it has none: a version an older
        nlora-serve wrote (sums.record). Best effort: a disk refusing it is logged once; this
        store does not try that version again (each cold load would wait for the write lock, fsync
        and log again), a restart does."""
        if os.path.lexists(Path(path) / SUMS_FILE) or Path(path) in self._unrecorded:  # no wait on a write
            return
        with self.write_lock:
            if not record(self.root / STAGING, Path(path), files):
                self._unrecorded.add(Path(path))

    def write(self, name: str, files: dict[str, bytes], same_as: dict[str, Path] | None = None) -> StoredVersion:
        """Durably write ``files`` as the next version of ``name`` and return it.

        The files are written and fsynced in a staging folder, which is then renamed into place
        and the parent fsynced: readers see the whole version or nothing.

        Args:
            files: file name -> bytes to write.
            same_as: file name -> a file of an earlier version of ``name`` that this version
                shares unchanged (a hot-swap's config): hard-linked, so there is nothing to write
                or fsync (its bytes are durable already); copied where links are not possible.

        Raises:
            AdapterError: invalid name, an escaping folder, a name that differs only in case from a
                stored adapter's (served or unloaded), a file name other than
                ``adapter_config.json`` / ``adapter_model.safetensors``, or files over ``max_bytes``
                together (the store would refuse to read them back).
            StoreWriteError: the disk refused a write (ENOSPC, EIO, ...): nothing of the new
                version is left, the store is as before; or the store's folder is gone.
            StoreReadError: a file of ``same_as`` is gone (its version folder removed by hand
                while the server runs): nothing was written.
        """
        same_as = same_as or {}
        self._check_root(name)
        unknown = sorted((set(files) | set(same_as)) - set(ALLOWED_FILES))
        if unknown:
            raise AdapterError(f"adapter {name!r}: files {unknown} are not allowed; "
                               f"a version holds only {', '.join(ALLOWED_FILES)}")
        total = sum(map(len, files.values())) + sum(_linked_size(name, Path(p)) for p in same_as.values())
        if total > self.max_bytes:
            raise AdapterError(f"adapter {name!r}: {total} bytes of files is over the server's --max-adapter-bytes "
                               f"{self.max_bytes}")
        batch = self.batch_of_caller()
        if batch is None:  # the store's first version (a start records it at its commit)
            self.record_base(name)
            self.record_settings(name)
        with self.write_lock:
            adapter_dir = self.adapter_dir(name)
            self._check_case(name)
            foreign = [str(p) for p in same_as.values() if Path(p).parent.parent != adapter_dir]
            if foreign:
                raise AdapterError(f"adapter {name!r}: {foreign} are not files of its versions in {self.root}")
            try:
                stored = self._write_locked(name, adapter_dir, files, same_as, batch)
                self.note_version(name, stored.version)
                return stored
            except FileNotFoundError as exc:  # a linked file removed since it was stat'ed above
                if exc.filename in {str(p) for p in same_as.values()}:
                    raise _linked_gone(name, Path(exc.filename)) from None
                raise
            except OSError as exc:
                raise_if_disk_error(name, exc)
                raise

    def _write_locked(self, name: str, adapter_dir: Path, files: dict[str, bytes],
                      same_as: dict[str, Path], batch: StartBatch | None) -> StoredVersion:
        """:meth:`write` under the lock. Durable order: files and their SHA256SUMS written, then
        they and the staged folder fsynced (together), renamed into place, the adapter's folder fsynced (and
        the root's, for a new name); only then is an UNLOADED marker removed (fsynced again). Any
        failure rolls back."""
        unloaded, created = (adapter_dir / UNLOADED).exists(), not adapter_dir.exists()
        staged, final = durable.make_temp_dir(self.root / STAGING, f"{name}."), None
        try:
            for fname, source in same_as.items():
                durable.link_or_copy(source, staged / fname)
            for fname, data in files.items():
                durable.write_unsynced(staged / fname, data)
            linked = {fname: (staged / fname).read_bytes() for fname in same_as}
            check_linked(self.root, name, same_as, linked)  # one replaced since is not recorded as the store's
            durable.write_unsynced(staged / SUMS_FILE, sums_bytes({**files, **linked}))  # in the folder the rename makes visible
            durable.fsync_together([staged / fname for fname in (*files, SUMS_FILE)], [staged])  # one journal commit
            version = max((self.versions(name) or [0])[-1], self.highest_version(name)) + 1
            # (the folder may be left from a failed write: make it durable now; or deleted by hand since
            # this process last wrote the name, whose version then goes on from the number it had)
            is_new = version == 1 or created
            if batch is not None:  # listed on disk first: a start killed after the rename is undone at the next open
                batch.announce(adapter_dir / f"{version:08d}", adapter_dir if created else None)
            if is_new:
                durable.mkdir(adapter_dir, exist_ok=True)
            durable.rename(staged, adapter_dir / f"{version:08d}")
            final, staged = adapter_dir / f"{version:08d}", None
            # the root's entry for a new name must be durable too
            durable.fsync_together(folders=[adapter_dir, self.root] if is_new else [adapter_dir])
            if unloaded:  # a new version serves again
                durable.unlink(adapter_dir / UNLOADED)
                fsync_dir(adapter_dir)
        except BaseException:
            self._roll_back(staged, final, unloaded, adapter_dir if created else None)
            raise
        if batch is not None:  # a start's write: taken back out should the start fail
            batch.wrote(final, adapter_dir if created else None)
        return StoredVersion(name, version, final)

    def _roll_back(self, staged: Path | None, final: Path | None, unloaded: bool, created: Path | None) -> None:
        """Undo a failed write: the staged folder, or the version renamed into place, leaves for
        the staging area; an UNLOADED marker already removed is put back (the name stays unloaded);
        the adapter's folder goes again if this write ``created`` it."""
        try:
            if final is not None:
                if unloaded:
                    (final.parent / UNLOADED).touch()
                staged = self.root / STAGING / f"failed.{final.parent.name}.{final.name}"
                os.rename(final, staged)
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            if created is not None and created.is_dir():
                created.rmdir()
        except OSError as exc:  # the next start discards whatever is left in the staging area
            log.warning("could not roll back a failed adapter write (%s); the next start cleans up", exc)

    def _check_root(self, name: str) -> None:
        """Raises StoreWriteError when the store's folder is gone (removed or unmounted while the
        server runs): an upload, swap or unload then failed with UNKNOWN "Unexpected <class
        'FileNotFoundError'>" and a traceback in the log."""
        if not self.root.is_dir():
            raise StoreWriteError(f"adapter {name!r}: the adapter store {self.root} is gone (no such folder: removed "
                                  "or unmounted while the server runs); nothing was changed and what was served "
                                  "before still serves; put the store back, or restart the server on one")

    def _check_case(self, name: str) -> None:
        """Raises AdapterError when a stored adapter's name differs from ``name`` only in case."""
        with os.scandir(self.root) as entries:
            check_no_case_twin(name, [e.name for e in entries if e.name != STAGING])

    def mark_unloaded(self, name: str) -> None:
        """Record durably that ``name`` is unloaded, so a restart does not serve it again.

        Raises:
            StoreWriteError: the disk refused the record (a full or read-only store), or the store's
                folder is gone: the name serves on.
        """
        adapter_dir = self.adapter_dir(name)
        self._check_root(name)
        with self.write_lock:
            if not adapter_dir.is_dir():
                return
            try:
                write_synced(adapter_dir / UNLOADED, b"")
                fsync_dir(adapter_dir)
            except OSError as exc:  # not recorded: the name serves on
                try:  # (an unlink of nothing on a read-only store fails too: it hid exc as a bare EROFS)
                    if os.path.lexists(adapter_dir / UNLOADED):
                        os.unlink(adapter_dir / UNLOADED)
                except OSError as again:
                    log.warning("could not remove %s (%s): check it is absent, or %r stays unloaded after a "
                                "restart", adapter_dir / UNLOADED, again.strerror or again, name)
                raise_if_disk_error(name, exc)
                raise

    def remove_version(self, name: str, version: int) -> None:
        """Delete one version folder (the registry calls this once no request holds it).

        The folder leaves the adapter's folder at once (one rename into the staging area); its
        files are deleted by a background thread, so the caller (often the engine thread, as the
        last request on a superseded version ends) does no more file work than that. Whatever a
        crash leaves in the staging area is discarded at the next start.
        """
        # Not under the write lock: a rename of one old folder cannot disturb a write (which only
        # adds the next number), and the engine thread must not wait out a swap's fsyncs here.
        batch = self.batch_of_caller()
        if batch is not None:  # a start's: removed once it succeeds (commit_batch), kept if it fails
            batch.removals.append((name, version))
            return
        path = self.adapter_dir(name) / f"{version:08d}"
        if not path.is_dir():
            return
        try:
            trash = durable.make_temp_dir(self.root / STAGING, "trash.")
            durable.rename(path, trash / "v")  # vanish atomically, then delete at leisure
        except FileNotFoundError:  # removed meanwhile by another caller
            pass
        except OSError as exc:  # a disk error: an older version stays on disk, harmless, pruned later
            log.warning("could not remove %s: %s", path, exc)
            return
        try:
            self._deleter.submit(shutil.rmtree, trash, ignore_errors=True)
        except RuntimeError:  # the interpreter is shutting down: the next start discards it
            log.info("left %s for the next start to delete", trash)

    def begin_batch(self) -> None:
        """Record the calling thread's writes to this store from now on, and defer its removals,
        until :meth:`commit_batch` or :meth:`abort_batch` (batch.py: a ``serve`` start's
        registrations). Only this thread's: a write or removal from any other thread while the
        batch is open (an admin upload or hot-swap once the servers are up, a version freed by the
        engine thread) is no part of the start and is never undone or deferred.

        Raises:
            RuntimeError: a batch is open on this store already (a programming error: one start
                per store; the open batch is left as it was).
        """
        with self.write_lock:
            if self._batch is not None:
                raise RuntimeError(f"adapter store {self.root}: a start batch is open on it already (opened by "
                                   f"thread {self._batch.thread}); commit or abort it before beginning another")
            self._batch = StartBatch(threading.get_ident(), Journal(self.root))

    def batch_of_caller(self) -> StartBatch | None:
        """The open start batch where the calling thread began it, else None (another thread's
        write is not the start's)."""
        batch = self._batch
        return batch if batch is not None and batch.thread == threading.get_ident() else None

    def commit_batch(self) -> None:
        """End the batch: the removals it deferred happen now (the versions its writes superseded),
        and where it wrote a version the store's base-model record is written if still due
        (base_record.py: a start that writes nothing records nothing, as a store is recorded at
        its first version). The batch's journal (journal.py) is removed before the removals; where
        the disk refuses that (logged), the removals are skipped: the older versions stay, since
        the next open takes the batch's writes back out.

        Raises:
            StoreWriteError: the disk refused the base-model record (the versions stay written).
        """
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            if batch.written:
                self.record_base()
            self.record_settings()  # the start's explicit --keep-versions, whether it wrote or not
        finally:
            # the journal goes first: a crash after a removal must not undo the start's writes too
            if batch.journal is None or batch.journal.remove():
                for name, version in batch.removals:
                    self.remove_version(name, version)

    def abort_batch(self) -> None:
        """End the batch by taking its writes back out of the store (newest first, each by one
        rename, durably); its deferred removals never happen, so the store is as the batch found it.
        For a start that failed: the registry's view of the names written is stale afterwards."""
        batch, self._batch = self._batch, None
        if batch is not None:
            with self.write_lock:
                batch.undo(self.root, self.root / STAGING)
                if batch.journal is not None:
                    batch.journal.remove()

    def record_base(self, name: str = "(the store's base-model record)") -> None:
        """Write the store's base-model record where it is still due (``base_pending``, set by
        base_record.check_base): at a start's commit, or before the first version written outside
        one (of adapter ``name``, which a refusal names).

        Raises:
            StoreWriteError: the disk refused it (it is due again at the next write).
        """
        if self.base_pending is None:
            return
        with self.write_lock:
            if self.base_pending is None:
                return
            try:
                write_record(self.root, self.base_pending)
            except OSError as exc:
                raise_if_disk_error(name, exc)
                raise
            self.base_pending = None

    def record_settings(self, name: str = "(the store's settings record)") -> None:
        """Write the ``--keep-versions`` a start gave where its record is still due (``keep_pending``,
        set by settings.resolve_keep_versions): at a start's commit, or before the first version
        written outside one (of adapter ``name``, which a refusal names).

        Raises:
            StoreWriteError: the disk refused it (it is due again at the next write).
        """
        keep = self.keep_pending
        if keep is None:
            return
        try:
            write_keep_versions(self, keep)
        except OSError as exc:
            raise_if_disk_error(name, exc)
            raise
        if self.keep_pending == keep:
            self.keep_pending = None

    def wait_deleted(self) -> None:
        """Block until the files of every version removed so far are deleted."""
        self._deleter.submit(lambda: None).result()  # one worker, first in first out


def _linked_size(name: str, path: Path) -> int:
    """The size of ``path``, a file of an earlier version of ``name`` that a new version links.

    Raises:
        StoreReadError: it is gone (:func:`_linked_gone`).
    """
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise _linked_gone(name, path) from None


def _linked_gone(name: str, path: Path) -> durable.StoreReadError:
    """The error for a linked file of adapter ``name`` that is gone: a hot-swap of a name whose
    store folder was deleted while the server ran failed with gRPC UNKNOWN "Unexpected <class
    'FileNotFoundError'>" and a traceback."""
    return durable.StoreReadError(
        f"adapter {name!r}: its stored file {path} is gone (its version folder was removed while the server runs); "
        "a hot-swap links the current version's config from there, so nothing was written and the current version "
        "serves on; upload the whole adapter again (`nlora-serve adapters upload`)")
