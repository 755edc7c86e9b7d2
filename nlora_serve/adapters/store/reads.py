"""AdapterStore: opens a store and reads it (names, versions, files checked against their SHA256SUMS).

Its writes (write, unload, remove) come from writes.py's StoreWrites; layout.py names what lies where.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nlora_serve.adapters.file_read import ALLOWED_FILES
from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.adapters.store import durable, journal, lock
from nlora_serve.adapters.names import validate_name
from nlora_serve.adapters.store.base_record import BASE_FILE, BaseIdentity
from nlora_serve.adapters.store.settings import SETTINGS_FILE
from nlora_serve.adapters.store.sweep import sweep_families
from nlora_serve.adapters.store.batch import StartBatch
from nlora_serve.adapters.store.layout import FAMILIES, STAGING, UNLOADED, StoredVersion, is_version_name
from nlora_serve.adapters.store.sums import check_sums, recorded
from nlora_serve.adapters.store.writes import StoreWrites
from nlora_serve.errors import AdapterError

log = logging.getLogger(__name__)

_open_stores: weakref.WeakSet[AdapterStore] = weakref.WeakSet()  # this process's, for a fork's child


def _new_deleter() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="adapter-store-delete")


def _own_threads_after_fork() -> None:
    """In a forked child, each store inherited gets a deleter and locks of its own: the parent's
    deleter thread is not in the child, and its pool, which counted it idle, queued every removal
    (and ``wait_deleted``) to nobody; a lock a parent thread held at the fork (a write in progress)
    stays held in the child, where no thread will release it. Either way the child hung."""
    for store in list(_open_stores):
        store._deleter = _new_deleter()
        store.write_lock, store._highest_lock = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_own_threads_after_fork)


class AdapterStore(StoreWrites):
    """Adapters on disk under one root; every path it touches stays inside that root. One process
    at a time opens a root (lock.py): AdapterError names it when another holds it.
    A version's files hold at most ``max_bytes`` together (--max-adapter-bytes, as an upload):
    more is refused when written and when read, before a byte of it is read. The root must be
    writable (AdapterError at construction otherwise, naming it)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES):
        self.max_bytes = max_bytes
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AdapterError(f"adapter store {self.root}: cannot create it ({exc.strerror or exc})") from None
        first, unlock = lock.claim(self, self.root)  # before the staging area is wiped: it may be another server's
        # serialises version allocation and renames (and factors.py's writes of _families)
        self.write_lock = threading.Lock()
        try:
            if first:  # what a crash left (another store of this process may hold it open, writing in there)
                self._clear_staging()
                journal.recover(self.root)  # a start killed before its commit is undone
                sweep_families(self.root, max_bytes)  # factors no version uses any more (sweep.py)
        except BaseException:
            # let go of the lock now, not once this half-opened store is collected: while a caller kept
            # the error (its traceback holds the store), a retry in this process was no first open, and
            # opened past the journal it had just refused, unchecked (and its own start's journal then
            # replaced that one: the killed start's writes were never taken back)
            unlock()
            raise
        self._deleter = _new_deleter()  # replaced in a forked child (_own_threads_after_fork)
        _open_stores.add(self)
        self._unrecorded: set[Path] = set()  # versions whose SHA256SUMS the disk refused: not retried
        # the highest version of each name listed or written by this process: a name's folder deleted
        # by hand while the server runs does not make its next version reuse a number still served
        self._highest: dict[str, int] = {}
        self._highest_lock = threading.Lock()
        self._batch: StartBatch | None = None  # a start's writes, undone should it fail (batch.py)
        # the base model to record as the store's (base_record.py), once a start commits or a version is written
        self.base_pending: BaseIdentity | None = None
        # an explicit --keep-versions to record (settings.py), as the base model, once a start commits
        self.keep_pending: int | None = None

    def _clear_staging(self) -> None:
        """Empty the staging area (what a crash left there), made anew; at this process's first open
        of the root only: a later open while an earlier store lives would delete that store's
        writes in flight (a version being staged, a rollback's copy).

        Raises:
            AdapterError: it cannot be cleared or made (a read-only store).
        """
        staging = self.root / STAGING
        try:
            if staging.is_symlink() or staging.is_file():  # planted: writes would land where it points
                staging.unlink()
            # leftovers of a crash; errors ignored: a store of this root this process opened earlier, now
            # gone, may have left its deleter thread still deleting in there (a restart in tests)
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.lexists(staging):
                shutil.rmtree(staging)  # again, to learn why it stays (a read-only store: EROFS)
            staging.mkdir()
        except OSError as exc:  # a read-only store: it was a bare FileExistsError of the mkdir
            raise AdapterError(f"adapter store {self.root}: cannot clear and create its staging folder {STAGING} "
                               f"({exc.strerror or exc}); the store must be a writable folder") from None

    def adapter_dir(self, name: str) -> Path:
        """The folder of ``name``, checked to be a real directory inside the root (or absent).

        Raises:
            AdapterError: invalid name, or the folder is a symlink or otherwise leaves the root.
        """
        # A valid name is one path component that is neither "." nor "..", and the root is
        # resolved, so only a symlink can lead out: one lstat decides.
        path = self.root / validate_name(name)
        try:
            is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        except FileNotFoundError:
            return path
        if is_link:
            raise AdapterError(f"adapter {name!r}: {path} is a symlink or leaves the store "
                               f"{self.root}; refusing to follow it")
        return path

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name`` on disk, ascending (empty when unknown): its folders named
        as :meth:`write` names them, 8 ASCII digits; a stray ``3``, ``٣`` or ``²`` is no version."""
        try:
            with os.scandir(self.adapter_dir(name)) as entries:
                found = sorted(int(e.name) for e in entries
                               if is_version_name(e.name) and e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []
        if found:
            self.note_version(name, found[-1])
        return found

    def note_version(self, name: str, version: int) -> None:
        """Remember that ``name`` has had ``version`` (listed or written): :meth:`write` numbers
        the next one above every version this process has seen, not only above what is on disk.
        Before, an operator who deleted ``STORE/NAME`` while it served v5 got v1 from the next
        upload, a second v2, ... (versions are per-name sequence numbers, DESIGN §3), and the old
        v2's release, once its last request ended, deleted the new v2's folder (same number)."""
        with self._highest_lock:
            self._highest[name] = max(self._highest.get(name, 0), version)

    def highest_version(self, name: str) -> int:
        """The highest version of ``name`` this process has listed or written (0: none)."""
        with self._highest_lock:
            return self._highest.get(name, 0)

    def latest(self, name: str) -> StoredVersion | None:
        """The newest complete version of ``name``, or None."""
        found = self.versions(name)
        return self.get(name, found[-1]) if found else None

    def get(self, name: str, version: int) -> StoredVersion:
        """One stored version (its content hash is computed from the files when asked).

        Raises:
            AdapterError: the version does not exist.
        """
        path = self.adapter_dir(name) / f"{version:08d}"
        if not path.is_dir():
            raise AdapterError(f"adapter {name!r} has no version {version} in {self.root}")
        return StoredVersion(name, version, path)

    def read_files(self, path: Path, names: tuple[str, ...] = ALLOWED_FILES) -> dict[str, bytes]:
        """The files of one of this store's version folders by name (those of ``names`` that
        exist), read without following a symbolic link at any level of the store, and checked
        against the sha256 the folder's SHA256SUMS recorded (where it has one: see
        :meth:`record_sums` for a version written before it existed).

        Raises:
            FileNotFoundError: the folder does not exist (a version removed since).
            AdapterError: ``path`` is not inside the store, a link or other non-regular entry is
                on the way (named by its path relative to the root), or the files are over
                ``max_bytes`` together (checked with fstat, before reading).
            StoredHashMismatch: a file is not the one the store wrote (sums.py).
        """
        try:
            folder = Path(path).relative_to(self.root)
        except ValueError:
            raise AdapterError(f"{path} is not a folder of the adapter store {self.root}") from None
        files = durable.read_folder(self.root, folder, names, self.max_bytes)
        sums = recorded(self.root, folder)  # its own cap: no file's
        if sums is not None:
            check_sums(folder.parent.name, self.root / folder, files, sums)
        return files

    def names(self, warn: bool = True) -> list[str]:
        """Served names: at least one complete version and not unloaded; invalid or escaping
        entries are skipped, with a warning each unless ``warn`` is False (a caller that only
        peeks before the registry's own scan, which warns).

        Of names that differ only in case (one folder on a case-insensitive file system, so
        :meth:`write` never makes them; an operator's copy can), the first in sorted order holds
        the name, served or unloaded; each later twin is skipped with an error naming both.
        """
        found, holders = [], {}  # holders: case-folded name -> the entry that holds it
        for entry in sorted(self.root.iterdir()):
            if entry.name in (STAGING, FAMILIES, BASE_FILE, SETTINGS_FILE, journal.JOURNAL_FILE):
                continue
            try:
                if not self.versions(entry.name):
                    if warn and any(os.path.lexists(entry / f) for f in ALLOWED_FILES):
                        log.warning("store entry %r not served: it holds adapter files but no version folder "
                                    "(NAME/00000001/); a store is written by the server, not by copying an "
                                    "adapter folder into it: move the folder out, then serve it with "
                                    "`serve --adapter NAME=DIR` or `nlora-serve adapters upload`", str(entry))
                    continue
            except (AdapterError, OSError) as exc:  # OSError: EACCES, EIO; skipped, not a crash of the start
                if warn:
                    # quoted: a folder's name may hold a newline or an escape (a forged log line)
                    log.warning("skipping store entry %r: %s", str(entry), exc)
                continue
            holder = holders.setdefault(entry.name.casefold(), entry.name)
            if holder != entry.name:
                if warn:
                    log.error("adapter store entry %s not served: the name %r differs only in case from the "
                              "stored adapter %r, which keeps the name (on a case-insensitive file system both "
                              "are one folder); rename or remove one of the two folders", entry, entry.name, holder)
            elif not (entry / UNLOADED).exists():
                found.append(entry.name)
        return found

    def is_unloaded(self, name: str) -> bool:
        """Whether an operator unloaded ``name`` (its UNLOADED marker is on disk).

        Raises:
            AdapterError: an invalid or escaping name.
        """
        return (self.adapter_dir(name) / UNLOADED).exists()

