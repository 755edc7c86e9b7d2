"""The adapter store's file operations, each one a named point a test can observe or fail.

Every store write path goes through these functions, in the durable order the store relies on
(write, fsync the file, fsync its folder, rename into place, fsync the parent): see writes.py.
:func:`set_fault_hook` installs a callable that sees each operation just before it runs, as a
:class:`FileOp`; it may record it (the durability-order tests), raise an ``OSError`` in its place
(a disk that fills up: ENOSPC, EIO) or kill the process there (the crash tests). Without a hook
(always, outside tests) each point costs one global lookup. A write the disk refuses (full, quota,
read-only, I/O error, no permission) becomes :class:`StoreWriteError` (:func:`raise_if_disk_error`).

Reads go through :func:`read_folder`, which follows no symbolic link below the store's root: a
link or a FIFO planted in the store is refused by name, never read through.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.errors import AdapterError, NloraError

# errors of a full or failing disk: a write refused with one is a StoreWriteError
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
# a store (or a folder of it) the server may not write: another user's, or an immutable one
# (chattr +i). These were re-raised as bugs: gRPC UNKNOWN "Unexpected <class 'PermissionError'>",
# HTTP 500, a traceback in the log, where a read-only mount (EROFS) was a StoreWriteError
ACCESS_ERRORS = frozenset({errno.EACCES, errno.EPERM})
# the kinds of operation, in the order a new file goes through them
KINDS = ("mkdir", "create", "write", "fsync_file", "link", "fsync_dir", "rename", "unlink")


class StoreWriteError(NloraError):
    """The store's disk refused a write (no space, quota, I/O error, read-only, no permission); the
    store is unchanged and what it served before it still serves (gRPC RESOURCE_EXHAUSTED, HTTP 507)."""


class StoreReadError(AdapterError):
    """A file or folder of the store cannot be read as the store wrote it: a symbolic link, FIFO or
    other non-regular entry planted there, files over --max-adapter-bytes, or a read the disk
    refused (EACCES, EIO). The store's fault, not the call's that read it (gRPC INTERNAL, HTTP 500
    adapter_load_failed); at a start the version is skipped with a warning."""


def raise_if_disk_error(name: str, exc: OSError) -> None:
    """Raises :class:`StoreWriteError` (from ``exc``) naming the disk's error when a write of adapter
    ``name`` failed with one of :data:`DISK_ERRORS` or :data:`ACCESS_ERRORS` (the latter naming the
    path refused); returns for any other ``exc`` (a bug, not the disk), which the caller re-raises
    as it is."""
    if exc.errno in DISK_ERRORS or exc.errno in ACCESS_ERRORS:
        what = f"{errno.errorcode.get(exc.errno, exc.errno)}: {os.strerror(exc.errno)}"
        if exc.errno in ACCESS_ERRORS:
            where = f" on {exc.filename}" if exc.filename else ""
            if exc.filename and exc.filename2:  # a rename: the folder refused is the target's
                where = f" on the rename of {exc.filename} to {exc.filename2}"
            fix = "give the server's user write access to the store (or clear an immutable flag: chattr -i)"
        else:
            where, fix = "", "free space or fix the disk"
        raise StoreWriteError(f"adapter {name!r}: the adapter store's disk refused the write ({what}){where}; "
                              f"nothing was changed and what was served before still serves; {fix}, "
                              "then retry") from exc


@dataclass(frozen=True, slots=True)
class FileOp:
    """One file operation about to run: ``kind`` (one of :data:`KINDS`) on ``path``; ``target``
    is a rename's or link's destination; ``data`` the bytes of a ``write``."""

    kind: str
    path: Path
    target: Path | None = None
    data: bytes | None = None


FaultHook = Callable[[FileOp], None]
_hook: FaultHook | None = None


def set_fault_hook(hook: FaultHook | None) -> FaultHook | None:
    """Install ``hook`` (None removes it) for every store file operation; returns the previous one."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def _point(kind: str, path: Path, target: Path | None = None, data: bytes | None = None) -> None:
    if _hook is not None:
        _hook(FileOp(kind, Path(path), None if target is None else Path(target), data))


def write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (the folder entry is the caller's to fsync)."""
    write_unsynced(path, data)
    _fsync_path(path)


def write_unsynced(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data``, not yet durable: the caller fsyncs it with
    :func:`fsync_together` before anything that relies on it (the rename that publishes it)."""
    _point("create", path)
    with open(path, "wb") as f:
        _point("write", path, data=data)
        f.write(data)


_fsync_pool: ThreadPoolExecutor | None = None
_fsync_pool_lock = threading.Lock()


def _forget_fsync_pool() -> None:
    """In a forked child: the parent's pool has no threads here (fork copies only the forking
    thread), yet it counted its workers as idle, so a child's first fsync_together queued its
    fsyncs to nobody and hung for ever (a ``multiprocessing`` fork after the store had written).
    The child makes its own pool at its first use; the lock may have been held by a parent thread."""
    global _fsync_pool, _fsync_pool_lock
    _fsync_pool, _fsync_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_fsync_pool)


def fsync_together(files: Sequence[Path] = (), folders: Sequence[Path] = ()) -> None:
    """fsync every one of ``files`` and ``folders`` at once; returns when all of them are durable.

    Each fsync waits for a journal commit (ext4's jbd2, XFS's log force): issued in turn, n fsyncs
    wait for n commits (~4 ms each on this project's virtual disks, so a hot-swap's four cost 16 ms);
    issued together from threads, the file system batches them into one commit (measured here: a
    file, a small file and their folder 12-16 ms in turn, ~4 ms together). The guarantee is that of
    calling them in turn: each is durable when this returns, with no order among them, so callers
    group only operations that need none (a staged folder's files and the folder itself, before the
    rename that publishes it). Each one's fault point (:func:`set_fault_hook`) is taken in order on
    the calling thread just before its fsync is issued, files first.

    Raises:
        OSError: the first fsync that failed (once every one has finished).
    """
    global _fsync_pool
    jobs = [(path, False) for path in files] + [(path, True) for path in folders]
    if len(jobs) == 1:
        (path, is_dir), = jobs
        fsync_dir(path) if is_dir else _fsync_path(path)
        return
    with _fsync_pool_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store-fsync")
    futures = []
    try:
        for path, is_dir in jobs:
            _point("fsync_dir" if is_dir else "fsync_file", path)
            futures.append(_fsync_pool.submit(_fsync_fd, path))
    finally:  # a fault point that raised: the fsyncs issued before it end before the caller rolls back
        errors = [f.exception() for f in futures]  # waits for every one
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _fsync_path(path: Path) -> None:
    _point("fsync_file", path)
    _fsync_fd(path)


def _fsync_fd(path: Path) -> None:
    """fsync ``path`` through a fresh descriptor (Linux flushes the file's or folder's every dirty
    page and entry, whichever descriptor wrote them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(source: Path, path: Path) -> None:
    """Hard-link ``source`` at ``path`` (its bytes are durable already), else an fsynced copy."""
    try:
        _point("link", source, path)
        os.link(source, path)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        write_synced(path, source.read_bytes())  # no hard links on this file system


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that the entries created, renamed or removed in it are durable."""
    _point("fsync_dir", path)
    _fsync_fd(path)


def mkdir(path: Path, exist_ok: bool = False) -> None:
    if exist_ok and path.is_dir():
        return
    _point("mkdir", path)
    path.mkdir(exist_ok=exist_ok)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/<prefix><random>`` (tempfile.mkdtemp's job, as one observable mkdir)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            mkdir(path)
            return path
        except FileExistsError:
            continue


def rename(source: Path, target: Path) -> None:
    _point("rename", source, target)
    os.rename(source, target)


def unlink(path: Path, missing_ok: bool = False) -> None:
    if missing_ok and not os.path.lexists(path):
        return
    _point("unlink", path)
    path.unlink(missing_ok=missing_ok)


def read_folder(root: Path, folder: Path, names: Iterable[str], max_bytes: int,
                cap: str | None = None, full_paths: bool = False) -> dict[str, bytes]:
    """The bytes of those of ``names`` that exist in ``root/folder``, by name. Every folder below
    ``root`` and every file is opened with O_NOFOLLOW and checked with fstat to be a folder or a
    regular file, so no symbolic link in the store is followed, whatever its level; the files'
    sizes (fstat) are checked against ``max_bytes`` together before any byte is read (``cap``: that
    bound in the refusal's words; by default the server's --max-adapter-bytes).

    Raises:
        FileNotFoundError: ``root/folder`` does not exist (e.g. a version removed since).
        StoreReadError: a symbolic link, FIFO, device or other non-regular entry on the way, named
            by its path relative to ``root`` (its full path where ``full_paths``: an entry at the
            root itself, which relative to it would be "."); files of more than ``max_bytes``
            bytes together; any other error reading them (EACCES, EIO).
    """
    folder, fds = Path(folder), {}
    shown = Path(root) if full_paths else Path()  # what the messages name paths relative to
    dir_fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the root itself was resolved by the caller
    try:
        for depth, part in enumerate(folder.parts):
            child = _open_entry(part, dir_fd, shown.joinpath(*folder.parts[: depth + 1]), is_dir=True)
            os.close(dir_fd)
            dir_fd = child
        for name in names:
            fd = _open_entry(name, dir_fd, shown / folder / name, is_dir=False)
            if fd is not None:
                fds[name] = fd
        sizes = {name: os.fstat(fd).st_size for name, fd in fds.items()}
        if sum(sizes.values()) > max_bytes:
            cap = cap or f"the server's --max-adapter-bytes {max_bytes}"
            verb, them = ("are", "them") if len(fds) > 1 else ("is", "it")
            raise StoreReadError(f"adapter store folder {(shown / folder).as_posix()}: {' + '.join(fds)} {verb} "
                                 f"{sum(sizes.values())} bytes, over {cap}: refusing to read {them}")
        return {name: _read_all(fd, sizes[name]) for name, fd in fds.items()}
    except FileNotFoundError:
        raise
    except OSError as exc:  # EACCES, EIO, ...: a refusal of this version, not a crash of the start
        raise StoreReadError(f"adapter store folder {(shown / folder).as_posix()}: cannot read it "
                             f"({exc.strerror or exc})") from None
    finally:
        for fd in (dir_fd, *fds.values()):
            os.close(fd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO cannot block the open


def _open_entry(name: str, dir_fd: int, shown: Path, is_dir: bool) -> int | None:
    """An fd of ``name`` in ``dir_fd``, a folder or a regular file as ``is_dir`` asks, opened
    without following a link; None for a file that does not exist (a missing folder raises)."""
    is_kind = stat.S_ISDIR if is_dir else stat.S_ISREG
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode  # no open of a FIFO or device
        if not is_kind(mode):
            raise _not_kind(shown, mode, is_dir)
        fd = os.open(name, _DIR_FLAGS if is_dir else _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if is_dir:
            raise
        return None
    except OSError as exc:  # replaced by a link or a folder since the stat
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
            raise _not_kind(shown, stat.S_IFLNK if exc.errno == errno.ELOOP else 0, is_dir) from None
        raise
    mode = os.fstat(fd).st_mode
    if not is_kind(mode):
        os.close(fd)
        raise _not_kind(shown, mode, is_dir)
    return fd


def _not_kind(shown: Path, mode: int, is_dir: bool) -> StoreReadError:
    if stat.S_ISLNK(mode):
        return StoreReadError(f"adapter store entry {shown.as_posix()} is a symbolic link; the store follows no "
                              "links: refusing it (put the file itself there)")
    return StoreReadError(f"adapter store entry {shown.as_posix()} is not a {'folder' if is_dir else 'regular file'}: "
                          "refusing it")


def _read_all(fd: int, size: int) -> bytes:
    """The file's first ``size`` bytes (its fstat size: a file grown since is cut there)."""
    with open(fd, "rb", closefd=False) as f:
        return f.read(size)


# link(2) failures that mean "this file system has no hard links here": copy instead
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
