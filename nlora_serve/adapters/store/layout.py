"""Where an adapter store keeps what: its file and folder names, one stored version, a content hash.

Layout under the root (``--adapter-dir``)::

    <name>/<version:08d>/adapter_config.json   (is_version_name: only such a folder is a version)
    <name>/<version:08d>/adapter_model.safetensors
    <name>/<version:08d>/SHA256SUMS    the files' sha256, written with them and checked on every read
                                       (sums.py); a version an older nlora-serve wrote gets
                                       it at its first load (record_sums)
    <name>/UNLOADED                present while the name is unloaded: not served after a restart
    .staging/                      temporary folders; whatever is here after a crash is discarded
    .base_model.json               the base model the store serves (base_record.py)
    .start_batch.json              present while a start that wrote is uncommitted: what it wrote,
                                   undone at the next open should it be killed (journal.py)
    _families/<key>/family.safetensors   a compressed family's shared factors (adapters/family.py),
                                         written as durably as a version (factors.py)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.adapters.file_read import ALLOWED_FILES
from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.adapters.store import durable

# a version's files are an adapter folder's (adapters/file_read.py: CONFIG_FILE, WEIGHTS_FILE, ALLOWED_FILES),
# its byte bound the readers' (adapters/limits.py: DEFAULT_MAX_ADAPTER_BYTES)
STAGING = ".staging"
UNLOADED = "UNLOADED"
FAMILIES = "_families"  # shared factors of compressed families (adapters/family.py), not an adapter
FACTORS_FILE = "family.safetensors"  # a family's file in FAMILIES/<key>/


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


def is_version_name(folder: str) -> bool:
    """Whether ``folder`` is a version folder's name: ``f"{version:08d}"`` of a version >= 1 (8
    ASCII digits; a stray ``3``, ``٣``, ``²`` or ``notes`` beside the versions is no version)."""
    return folder.isascii() and folder.isdigit() and int(folder) > 0 and folder == f"{int(folder):08d}"
