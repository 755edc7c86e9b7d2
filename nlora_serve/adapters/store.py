"""The adapter store: one folder per adapter name, one sub-folder per version, written atomically.

Layout under the root (``--adapter-dir``)::

    <name>/<version:08d>/adapter_config.json
    <name>/<version:08d>/adapter_model.safetensors
    <name>/<version:08d>/SHA256SUMS    the files' sha256, written with them and checked on every read
                                       (store_sums.py); a version an older nlora-serve wrote gets
                                       it at its first load (record_sums)
    <name>/UNLOADED                present while the name is unloaded: not served after a restart
    .staging/                      temporary folders; whatever is here after a crash is discarded
    _families/<key>/family.safetensors   a compressed family's shared factors (adapters/family.py),
                                         written as durably as a version (store_factors.py)

A version becomes visible only by ``rename`` of a fully written and fsynced folder, so a crash at
any point leaves either the old state or the new one, never a half-written adapter (DESIGN §3).
A version written as a hot-swap shares the unchanged config with the version before it (a hard
link to a file already on disk). Its fsyncs are issued together where no order is needed
(durable.fsync_together), so it waits for two journal commits: one for the new weights, their
SHA256SUMS and the staged folder, one for the adapter's folder after the rename.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.adapters import durable, store_lock
from nlora_serve.adapters.durable import StoreWriteError, fsync_dir, raise_if_disk_error, write_synced
from nlora_serve.adapters.names import check_no_case_twin, validate_name
from nlora_serve.adapters.store_sums import SUMS_FILE, check_linked, check_sums, record, recorded, sums_bytes
from nlora_serve.errors import AdapterError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALLOWED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
STAGING = ".staging"
UNLOADED = "UNLOADED"
FAMILIES = "_families"  # shared factors of compressed families (adapters/family.py), not an adapter
FACTORS_FILE = "family.safetensors"  # a family's file in FAMILIES/<key>/
DEFAULT_MAX_ADAPTER_BYTES = 256 << 20  # --max-adapter-bytes: one version's files together, bytes


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One complete version of an adapter on disk."""

    name: str
    version: int  # per-name sequence number, starting at 1
    path: Path  # the version folder

    @property
    def content_hash(self) -> str:
        """sha256 hex over the folder's files (see :func:`content_hash`), read when asked: the
        serving path keys on the adapter's own hash and never needs this one.

        Raises:
            FileNotFoundError: the version was removed since.
            AdapterError: as :meth:`AdapterStore.read_files`.
        """
        root = self.path.parent.parent
        return content_hash(durable.read_folder(root, self.path.relative_to(root), ALLOWED_FILES,
                                                DEFAULT_MAX_ADAPTER_BYTES))


def content_hash(files: dict[str, bytes]) -> str:
    """sha256 hex over each file's name, size and bytes, names sorted."""
    h = hashlib.sha256()
    for fname in sorted(files):
        h.update(f"{fname}|{len(files[fname])}\n".encode())
        h.update(files[fname])
    return h.hexdigest()


class AdapterStore:
    """Adapters on disk under one root; every path it touches stays inside that root. One process
    at a time opens a root (adapters/store_lock.py): AdapterError names it when another holds it.
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
        store_lock.claim(self, self.root)  # before the staging area is wiped: it may be another server's
        # serialises version allocation and renames (and store_factors.py's writes of _families)
        self.write_lock = threading.Lock()
        staging = self.root / STAGING
        try:
            if staging.is_symlink() or staging.is_file():  # planted: writes would land where it points
                staging.unlink()
            # leftovers of a crash; errors ignored: another store of this root in this process may be
            # deleting in there too (a restart in tests, the serve command's early peek)
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.lexists(staging):
                shutil.rmtree(staging)  # again, to learn why it stays (a read-only store: EROFS)
            staging.mkdir()
        except OSError as exc:  # a read-only store: it was a bare FileExistsError of the mkdir
            raise AdapterError(f"adapter store {self.root}: cannot clear and create its staging folder {STAGING} "
                               f"({exc.strerror or exc}); the store must be a writable folder") from None
        self._deleter = ThreadPoolExecutor(1, thread_name_prefix="adapter-store-delete")
        self._unrecorded: set[Path] = set()  # versions whose SHA256SUMS the disk refused: not retried

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
                return sorted(int(e.name) for e in entries if _is_version(e.name) and e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

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
            StoredHashMismatch: a file is not the one the store wrote (store_sums.py).
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

    def record_sums(self, path: Path, files: dict[str, bytes]) -> None:
        """Record the sha256 of ``files`` (all of version folder ``path``'s, read through
        :meth:`read_files` and validated) in its SHA256SUMS where it has none: a version an older
        nlora-serve wrote (store_sums.record). Best effort: a disk refusing it is logged once; this
        store does not try that version again (each cold load would wait for the write lock, fsync
        and log again), a restart does."""
        if os.path.lexists(Path(path) / SUMS_FILE) or Path(path) in self._unrecorded:  # no wait on a write
            return
        with self.write_lock:
            if not record(self.root / STAGING, Path(path), files):
                self._unrecorded.add(Path(path))

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
            if entry.name in (STAGING, FAMILIES):
                continue
            try:
                if not self.versions(entry.name):
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
        """
        same_as = same_as or {}
        self._check_root(name)
        unknown = sorted((set(files) | set(same_as)) - set(ALLOWED_FILES))
        if unknown:
            raise AdapterError(f"adapter {name!r}: files {unknown} are not allowed; "
                               f"a version holds only {', '.join(ALLOWED_FILES)}")
        total = sum(map(len, files.values())) + sum(os.stat(p).st_size for p in same_as.values())
        if total > self.max_bytes:
            raise AdapterError(f"adapter {name!r}: {total} bytes of files is over the server's --max-adapter-bytes "
                               f"{self.max_bytes}")
        with self.write_lock:
            adapter_dir = self.adapter_dir(name)
            self._check_case(name)
            foreign = [str(p) for p in same_as.values() if Path(p).parent.parent != adapter_dir]
            if foreign:
                raise AdapterError(f"adapter {name!r}: {foreign} are not files of its versions in {self.root}")
            try:
                return self._write_locked(name, adapter_dir, files, same_as)
            except OSError as exc:
                raise_if_disk_error(name, exc)
                raise

    def _write_locked(self, name: str, adapter_dir: Path, files: dict[str, bytes],
                      same_as: dict[str, Path]) -> StoredVersion:
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
            version = (self.versions(name) or [0])[-1] + 1
            is_new = version == 1  # (the folder may be left from a failed write: make it durable now)
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

    def is_unloaded(self, name: str) -> bool:
        """Whether an operator unloaded ``name`` (its UNLOADED marker is on disk).

        Raises:
            AdapterError: an invalid or escaping name.
        """
        return (self.adapter_dir(name) / UNLOADED).exists()

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

    def wait_deleted(self) -> None:
        """Block until the files of every version removed so far are deleted."""
        self._deleter.submit(lambda: None).result()  # one worker, first in first out


def _is_version(folder: str) -> bool:
    """Whether ``folder`` is a version folder's name: ``f"{version:08d}"`` of a version >= 1."""
    return folder.isascii() and folder.isdigit() and int(folder) > 0 and folder == f"{int(folder):08d}"
