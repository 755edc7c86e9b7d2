"""An adapter's versions kept in a store: listed (read only, beside a running server) and rolled
back offline (``adapters versions`` / ``adapters rollback``).

A store keeps the newest ``serve --keep-versions`` versions of each name (1 by default: the current
one only; the store records N, settings.py, so a start without the flag keeps the same). A rollback writes the chosen version's files again as the name's next version, so version
numbers only grow (every response names the version it ran on) and the content hash of the rolled-back
version is the old one's. Offline it takes the store's lock (a server running on the store refuses
it, naming the live way: ``adapters load --name NAME --version V``, a hot swap).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.adapters.file_read import ALLOWED_FILES
from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.adapters.names import validate_name
from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.layout import UNLOADED, StoredVersion, content_hash, is_version_name
from nlora_serve.adapters.store.lock import StoreInUse
from nlora_serve.adapters.store.reads import AdapterStore
from nlora_serve.adapters.store.sums import StoredHashMismatch, check_sums, recorded
from nlora_serve.errors import AdapterError


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One kept version of an adapter, as ``adapters versions`` lists it."""

    version: int  # the per-name sequence number
    created: float  # its folder's modification time, seconds since the epoch (when it was written)
    files_sha256: str  # layout.content_hash over its files: equal for a rollback and its original
    size: int  # bytes of its files together
    state: str  # "current" (the newest, what a start serves), "unloaded" (the newest of an unloaded name), "kept"
    intact: bool | None  # its files match its SHA256SUMS (None: none recorded, an older nlora-serve's)


def _adapter_dir(root: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(resolved root, the folder of ``name`` in it), both checked to exist, no link followed.

    Raises:
        AdapterError: no such store folder, an invalid name, or no such adapter in the store.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise AdapterError(f"adapter store {root}: no such folder")
    folder = root / validate_name(name)
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        mode = None
    if mode is None or not stat.S_ISDIR(mode):
        raise AdapterError(f"adapter {name!r} is not in the store {root}")
    return root, folder


def list_versions(root: str | os.PathLike, name: str,
                  max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> list[VersionInfo]:
    """The versions of ``name`` kept under store ``root``, oldest first. Read only and without the
    store's lock, so it may run beside the server that owns the store: a version that server
    deletes meanwhile is left out.

    Raises:
        AdapterError: as :func:`_adapter_dir`; a name with no version; StoreReadError (an
            AdapterError kind): a link or FIFO planted in a version folder, files over ``max_bytes``.
    """
    root, folder = _adapter_dir(root, name)
    with os.scandir(folder) as entries:
        numbers = sorted(int(e.name) for e in entries if is_version_name(e.name) and e.is_dir(follow_symlinks=False))
    unloaded = os.path.lexists(folder / UNLOADED)
    found = []
    for number in numbers:
        relative = Path(folder.name) / f"{number:08d}"
        try:
            files = durable.read_folder(root, relative, ALLOWED_FILES, max_bytes)
            sums = recorded(root, relative)
            created = os.lstat(root / relative).st_mtime
        except FileNotFoundError:  # pruned by a running server since the scan
            continue
        try:  # a file SHA256SUMS recorded and the folder lacks (deleted by hand) is a change too
            intact = None if sums is None else (check_sums(name, root / relative, files, sums) is None
                                                and set(sums) <= set(files))
        except StoredHashMismatch:
            intact = False
        state = ("unloaded" if unloaded else "current") if number == numbers[-1] else "kept"
        found.append(VersionInfo(number, created, content_hash(files), sum(map(len, files.values())), state, intact))
    if not found:
        raise AdapterError(f"adapter {name!r} has no complete version in the store {root}")
    return found


def rollback(root: str | os.PathLike, name: str, to: int,
             max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> tuple[StoredVersion, bool]:
    """Write version ``to`` of ``name`` again as its next version, under the store's lock (no
    server may run on ``root``). Returns (the version written, whether the name was unloaded: it
    serves again at the next start, as after a new upload). The files are checked against their
    SHA256SUMS first; they are not validated against a model (the store's base model took them
    when they were registered); the next start validates and serves the new version, and prunes
    the name to the N the store records (settings.py; a start's explicit ``--keep-versions``).

    Raises:
        AdapterError: as :func:`_adapter_dir`; the store is in use (a server on it: the message says
            how to roll back live), ``to`` is not kept (the message lists those kept), is the
            current version already, or lacks one of its two files (a folder emptied or made by
            hand); StoredHashMismatch: its files changed on disk since written.
        StoreWriteError: the disk refused the write (nothing was written).
    """
    root, folder = _adapter_dir(root, name)
    try:
        store = AdapterStore(root, max_bytes=max_bytes)
    except StoreInUse as exc:
        raise StoreInUse(f"{exc}. To roll back on the running server (a hot swap, as an upload): nlora-serve "
                         f"adapters load --name {name} --version {to} (admin key)") from None
    kept = store.versions(name)
    if to not in kept:
        raise AdapterError(f"adapter {name!r} has no version {to} in {root}: it keeps "
                           f"{', '.join(f'v{v}' for v in kept) or 'none'} (serve --keep-versions N keeps the newest N)")
    unloaded = store.is_unloaded(name)
    if to == kept[-1] and not unloaded:
        raise AdapterError(f"adapter {name!r}: v{to} is its current version already; nothing to roll back")
    files = store.read_files(store.get(name, to).path)  # StoredHashMismatch: changed since written
    missing = [f for f in ALLOWED_FILES if f not in files]
    if missing:  # a folder emptied or made by hand: written as the current version, no start could serve it
        raise AdapterError(f"adapter {name!r}: v{to} in {root} lacks {' and '.join(missing)} (a folder emptied or "
                           "made by hand?): not rolled back; pick another kept version (adapters versions "
                           f"{name} --adapter-dir {root})")
    return store.write(name, files), unloaded
