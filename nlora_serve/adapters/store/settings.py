"""How many versions of each name a store keeps: ``.store_settings.json`` at its root.

``serve --keep-versions N`` keeps a name's newest N versions to roll back to. Before, only the
flag said so: a later start without it (``make serve``) took the default 1 and deleted the kept
versions, one WARNING line naming them, so an operator who set 3 once lost their rollback targets
by restarting the usual way. Now the store remembers the N a start asked for explicitly: a start
without ``--keep-versions`` keeps what the store records (1 where it records nothing); only an
explicit smaller N prunes (still naming what it deletes), and is recorded in turn. A command that
only reads the store (``generate --adapter-dir``: ``KEEP_ALL_VERSIONS``) records nothing.

The record is written as the base-model record is (base_record.py), and when: at a start's commit
(a failed start leaves the store as it was) or with the first version written outside a start;
staged and fsynced, renamed over the file, the root fsynced, under the store's write lock.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from nlora_serve.adapters.limits import KEEP_ALL_VERSIONS
from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.layout import STAGING
from nlora_serve.errors import AdapterError

log = logging.getLogger("nlora_serve.adapters.store")

SETTINGS_FILE = ".store_settings.json"  # no adapter name starts with "." (names.py): never a name's folder
FORMAT = 1
_MAX_BYTES = 1 << 16  # the record is ~100 bytes; a larger file is not one
DEFAULT_KEEP = 1  # what a store without a record keeps: the current version only


def recorded_keep_versions(root: Path) -> int | None:
    """The ``--keep-versions`` the store at ``root`` (resolved) records, or None where it has none.

    Raises:
        AdapterError: the record is a link, not a regular file, unreadable or not the JSON this
            module writes (the message names the file and how to recover).
    """
    fix = (f"remove it (the store then keeps {DEFAULT_KEEP} version of each name) or start once with "
           "--keep-versions N, which records N")
    try:
        data = durable.read_folder(root, Path(), (SETTINGS_FILE,), _MAX_BYTES, cap=f"{_MAX_BYTES} bytes",
                                   full_paths=True)
    except durable.StoreReadError as exc:
        raise AdapterError(f"{exc}; it should hold the store's settings: {fix}") from None
    if SETTINGS_FILE not in data:
        return None
    try:
        keep = json.loads(data[SETTINGS_FILE])["keep_versions"]
        if type(keep) is not int or not 1 <= keep < KEEP_ALL_VERSIONS:
            raise ValueError(keep)
    except (ValueError, TypeError, KeyError, RecursionError):
        raise AdapterError(f"adapter store {root}: {SETTINGS_FILE} is not a settings record (JSON with a "
                           f"positive integer 'keep_versions'): {fix}") from None
    return keep


def write_keep_versions(store, keep: int) -> None:
    """Durably (re)write ``store``'s (an AdapterStore) record of ``keep``: written and fsynced in the
    staging area, renamed over ``SETTINGS_FILE``, the root fsynced, under the store's write lock.

    Raises:
        OSError: the disk refused it (the record is as before).
    """
    from nlora_serve import __version__

    body = {"format": FORMAT, "keep_versions": keep, "written_by": f"nlora-serve {__version__}"}
    with store.write_lock:
        staged = durable.make_temp_dir(store.root / STAGING, "settings.")
        try:
            durable.write_synced(staged / SETTINGS_FILE, (json.dumps(body, indent=1) + "\n").encode())
            durable.rename(staged / SETTINGS_FILE, store.root / SETTINGS_FILE)
            durable.fsync_dir(store.root)
        finally:
            shutil.rmtree(staged, ignore_errors=True)


def resolve_keep_versions(store, requested: int | None) -> int:
    """The versions of each name ``store`` (an AdapterStore) keeps for a start that asked for
    ``requested``: None (no ``--keep-versions``) takes the store's record (1 where none);
    ``KEEP_ALL_VERSIONS`` (a reader) is taken as is and recorded nowhere; another N is taken, and
    recorded where the record differs (``store.keep_pending``: at the start's commit, so that a
    failed start leaves the store as it was, or with the next version written outside a start).
    A smaller N than recorded: the registry's scan deletes the versions beyond it, one WARNING
    naming them.

    Raises:
        AdapterError: an unreadable record (:func:`recorded_keep_versions`).
    """
    recorded = recorded_keep_versions(store.root)
    if requested is None:
        return recorded if recorded is not None else DEFAULT_KEEP
    if requested == KEEP_ALL_VERSIONS or requested == (recorded if recorded is not None else DEFAULT_KEEP):
        return requested
    if recorded is not None and requested < recorded:
        log.info("--keep-versions %d: the adapter store %s kept %d versions of each name; recording %d (the "
                 "registry's scan names the older versions it deletes)", requested, store.root, recorded, requested)
    store.keep_pending = requested  # written at the start's commit, or with the next version written outside one
    return requested
