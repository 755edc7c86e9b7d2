"""The adapter store's file operations, each one a named point a test can observe or fail.

Every store write path goes through these functions, in the durable order the store relies on
(write, fsync the file, fsync its folder, rename into place, fsync the parent): see store.py.
:func:`set_fault_hook` installs a callable that sees each operation just before it runs, as a
:class:`FileOp`; it may record it (the durability-order tests), raise an ``OSError`` in its place
(a disk that fills up: ENOSPC, EIO) or kill the process there (the crash tests). Without a hook
(always, outside tests) each point costs one global lookup.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# the kinds of operation, in the order a new file goes through them
KINDS = ("mkdir", "create", "write", "fsync_file", "link", "fsync_dir", "rename", "unlink")


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
    _point("create", path)
    with open(path, "wb") as f:
        _point("write", path, data=data)
        f.write(data)
        f.flush()
        _point("fsync_file", path)
        os.fsync(f.fileno())


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
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# link(2) failures that mean "this file system has no hard links here": copy instead
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
