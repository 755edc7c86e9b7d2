"""The adapter store: one folder per adapter name, one sub-folder per version, written atomically.

Layout under the root (``--adapter-dir``)::

    <name>/<version:08d>/adapter_config.json
    <name>/<version:08d>/adapter_model.safetensors
    <name>/UNLOADED                present while the name is unloaded: not served after a restart
    .staging/                      temporary folders; whatever is here after a crash is discarded

A version becomes visible only by ``rename`` of a fully written and fsynced folder, so a crash at
any point leaves either the old state or the new one, never a half-written adapter (DESIGN §3).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.adapters.names import validate_name
from nlora_serve.errors import AdapterError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALLOWED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
STAGING = ".staging"
UNLOADED = "UNLOADED"


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One complete version of an adapter on disk."""

    name: str
    version: int  # per-name sequence number, starting at 1
    path: Path  # the version folder
    content_hash: str  # sha256 hex over the folder's files (see :func:`content_hash`)


def content_hash(files: dict[str, bytes]) -> str:
    """sha256 hex over each file's name, size and bytes, names sorted."""
    h = hashlib.sha256()
    for fname in sorted(files):
        h.update(f"{fname}|{len(files[fname])}\n".encode())
        h.update(files[fname])
    return h.hexdigest()


class AdapterStore:
    """Adapters on disk under one root; every path it touches stays inside that root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # serialises version allocation and renames
        shutil.rmtree(self.root / STAGING, ignore_errors=True)  # leftovers of a crash
        (self.root / STAGING).mkdir()

    def adapter_dir(self, name: str) -> Path:
        """The folder of ``name``, checked to be a real directory inside the root (or absent).

        Raises:
            AdapterError: invalid name, or the folder is a symlink or otherwise leaves the root.
        """
        path = self.root / validate_name(name)
        if path.is_symlink() or (path.exists() and path.resolve().parent != self.root):
            raise AdapterError(f"adapter {name!r}: {path} is a symlink or leaves the store "
                               f"{self.root}; refusing to follow it")
        return path

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name`` on disk, ascending (empty when unknown)."""
        path = self.adapter_dir(name)
        if not path.is_dir():
            return []
        return sorted(int(p.name) for p in path.iterdir()
                      if p.name.isdigit() and p.is_dir() and not p.is_symlink())

    def latest(self, name: str) -> StoredVersion | None:
        """The newest complete version of ``name``, or None."""
        found = self.versions(name)
        return self.get(name, found[-1]) if found else None

    def get(self, name: str, version: int) -> StoredVersion:
        """One stored version, with its content hash recomputed from the files.

        Raises:
            AdapterError: the version does not exist.
        """
        path = self.adapter_dir(name) / f"{version:08d}"
        if not path.is_dir():
            raise AdapterError(f"adapter {name!r} has no version {version} in {self.root}")
        return StoredVersion(name, version, path, content_hash(self.read_files(path)))

    @staticmethod
    def read_files(path: Path) -> dict[str, bytes]:
        """The version folder's files by name (only the two allowed names)."""
        return {f: (path / f).read_bytes() for f in ALLOWED_FILES if (path / f).is_file()}

    def names(self) -> list[str]:
        """Served names: at least one complete version and not unloaded; invalid or escaping
        entries are skipped."""
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name == STAGING or (entry / UNLOADED).exists():
                continue
            try:
                if self.versions(entry.name):
                    found.append(entry.name)
            except AdapterError as exc:
                log.warning("skipping store entry %s: %s", entry, exc)
        return found

    def write(self, name: str, files: dict[str, bytes]) -> StoredVersion:
        """Durably write ``files`` as the next version of ``name`` and return it.

        The files are written and fsynced in a staging folder, which is then renamed into place
        and the parent fsynced: readers see the whole version or nothing.

        Raises:
            AdapterError: invalid name, an escaping folder, or a file name other than
                ``adapter_config.json`` / ``adapter_model.safetensors``.
        """
        unknown = sorted(set(files) - set(ALLOWED_FILES))
        if unknown:
            raise AdapterError(f"adapter {name!r}: files {unknown} are not allowed; "
                               f"a version holds only {', '.join(ALLOWED_FILES)}")
        with self._lock:
            adapter_dir = self.adapter_dir(name)
            staged = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.root / STAGING))
            try:
                for fname, data in files.items():
                    _write_synced(staged / fname, data)
                _fsync_dir(staged)
                is_new = not adapter_dir.exists()
                adapter_dir.mkdir(exist_ok=True)
                version = (self.versions(name) or [0])[-1] + 1
                final = adapter_dir / f"{version:08d}"
                os.rename(staged, final)
                (adapter_dir / UNLOADED).unlink(missing_ok=True)  # a new version serves again
                _fsync_dir(adapter_dir)
                if is_new:  # the root's entry for a new name must be durable too
                    _fsync_dir(self.root)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        return StoredVersion(name, version, final, content_hash(files))

    def mark_unloaded(self, name: str) -> None:
        """Record durably that ``name`` is unloaded, so a restart does not serve it again."""
        adapter_dir = self.adapter_dir(name)
        with self._lock:
            if adapter_dir.is_dir():
                _write_synced(adapter_dir / UNLOADED, b"")
                _fsync_dir(adapter_dir)

    def remove_version(self, name: str, version: int) -> None:
        """Delete one version folder (the registry calls this once no request holds it)."""
        path = self.adapter_dir(name) / f"{version:08d}"
        with self._lock:
            if path.is_dir():
                trash = Path(tempfile.mkdtemp(prefix="trash.", dir=self.root / STAGING))
                os.rename(path, trash / "v")  # vanish atomically, then delete at leisure
                shutil.rmtree(trash, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
