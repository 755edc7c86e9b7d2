"""The adapter store's ``_families`` folder: a compressed family's shared factors, written once.

Layout (see layout.py): ``<root>/_families/<key>/family.safetensors``, ``key`` the sha256 the
factors hash to (adapters/family.py). Written in a version's durable order, through the store's
staging area and under its write lock, before the member version that needs them to load.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.durable import fsync_dir, raise_if_disk_error, write_synced
from nlora_serve.adapters.store.reads import AdapterStore
from nlora_serve.adapters.store.layout import FACTORS_FILE, FAMILIES, STAGING
from nlora_serve.errors import AdapterError


def write_factors(store: AdapterStore, name: str, key: str, data_of: Callable[[], bytes]) -> Path:
    """Durably write a compressed family's shared factors (``data_of()``, called only when they
    are not there yet) as ``_families/<key>/family.safetensors`` for the registration of
    adapter ``name``, once (``key`` hashes them). In a version's durable order: the file
    written and fsynced in a staged folder, that folder fsynced and renamed into place,
    ``_families`` fsynced (and the root, for a new ``_families``), all before the member's
    version is written, which needs them to load.

    Raises:
        AdapterError: ``key`` is not 64 lowercase hex characters, or ``_families`` is a link or
            a file (the store follows no link).
        StoreWriteError: the disk refused a write: nothing of it is left.
    """
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise AdapterError(f"family key {key!r:.80} is not 64 lowercase hex characters")
    families, staged = store.root / FAMILIES, None
    with store.write_lock:
        try:
            is_new = not os.path.lexists(families)
            if not is_new and not stat.S_ISDIR(os.lstat(families).st_mode):
                raise AdapterError(f"adapter store entry {FAMILIES} is a link or a file, not a folder: refusing "
                                   "to write a family's factors through it")
            if os.path.isfile(families / key / FACTORS_FILE):
                return families / key / FACTORS_FILE
            staged = durable.make_temp_dir(store.root / STAGING, "family.")
            write_synced(staged / FACTORS_FILE, data_of())
            fsync_dir(staged)
            batch = store.batch_of_caller()
            if batch is not None:  # listed on disk first: a start killed after the rename is undone (journal.py)
                batch.announce(families / key, families if is_new else None)
            if is_new:
                durable.mkdir(families)
                fsync_dir(store.root)
            elif os.path.lexists(families / key):  # without the factors: what an older version's crash left
                durable.rename(families / key, durable.make_temp_dir(store.root / STAGING, "trash.") / "f")
            durable.rename(staged, families / key)
            staged = None
            fsync_dir(families)
            if batch is not None:  # a start's write: taken back out should the start fail (batch.py)
                batch.wrote(families / key, families if is_new else None)
        except OSError as exc:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            raise_if_disk_error(name, exc)
            raise
    return families / key / FACTORS_FILE
