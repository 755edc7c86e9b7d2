"""Family factors no version references, removed at a store's first open (with its recovery).

A compressed family's shared factors (``_families/<key>/``, factors.py) are written once, before
the first member version that needs them, and shared by every member. Before, nothing removed
them: after every member was removed (its folder deleted by hand, a start's pruning, a member
whose version write failed after its factors were written, an HTTP load whose member was later
replaced by another family's), they stayed on disk for ever.

The rule: at the first open of a store in a process (as the staging area is cleared and a killed
start is undone: no write of this process is under way, and the store's lock keeps other
processes out), a ``_families/<key>`` folder that the config of no version folder of any name
names (the current, an unloaded name's newest, every one kept to roll back to) is removed. Where
any version's config cannot be read, nothing is removed (a version that cannot be read may
reference any family). Not at a member's deletion while serving: a registration writes the
factors and then, outside the lock, its version, so a sweep then could remove factors a member is
about to need.

Crash-safe: each folder leaves by one rename into the staging area (which the next open clears),
``_families`` fsynced after, so a crash leaves it either referenced-and-whole or gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

from nlora_serve.adapters.file_read import CONFIG_FILE
from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.layout import FAMILIES, STAGING, is_version_name

log = logging.getLogger("nlora_serve.adapters.store")


class _Unreadable(Exception):
    """A version's config could not be read: the sweep removes nothing."""


def sweep_families(root: Path, max_bytes: int) -> list[str]:
    """Remove the ``_families/<key>`` folders of store ``root`` (resolved) that no version's config
    names. For the first open of ``root`` only (see the module). Returns the keys removed.

    Never raises for what it reads: a ``_families`` that is a link or a file, or a config it cannot
    read, leaves everything (logged); an OSError of a removal stops the sweep (logged), the folder
    not yet removed staying whole.
    """
    families = root / FAMILIES
    try:
        if not stat.S_ISDIR(os.lstat(families).st_mode):
            return []
        with os.scandir(families) as entries:
            keys = sorted(e.name for e in entries)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("adapter store %s: cannot list %s (%s): no family factors removed", root, FAMILIES, exc)
        return []
    if not keys:
        return []
    try:
        used = _referenced(root, max_bytes)
    except _Unreadable as exc:
        log.info("adapter store %s: %s; keeping every family's factors", root, exc)
        return []
    removed = []
    for key in keys:
        if key in used:
            continue
        try:
            trash = durable.make_temp_dir(root / STAGING, "trash.")
            durable.rename(families / key, trash / "f")
            durable.fsync_dir(families)
        except OSError as exc:
            log.warning("adapter store %s: could not remove the unused family factors %s/%s (%s)", root, FAMILIES,
                        key, exc)
            break
        shutil.rmtree(trash, ignore_errors=True)  # what is left there, the next open's clearing deletes
        removed.append(key)
    if removed:
        log.info("adapter store %s: removed the shared factors of %d famil%s no version uses any more: %s", root,
                 len(removed), "y" if len(removed) == 1 else "ies", ", ".join(k[:16] + "…" for k in removed))
    return removed


def _referenced(root: Path, max_bytes: int) -> set[str]:
    """The family keys the configs of every version folder of every name under ``root`` name.

    Raises:
        _Unreadable: a name's folder or a version's config could not be read or parsed.
    """
    used: set[str] = set()
    with os.scandir(root) as entries:
        names = [e.name for e in entries if not e.name.startswith((".", "_")) and e.is_dir(follow_symlinks=False)]
    for name in names:
        try:
            with os.scandir(root / name) as inner:
                versions = [e.name for e in inner if is_version_name(e.name) and e.is_dir(follow_symlinks=False)]
        except OSError as exc:
            raise _Unreadable(f"cannot list {name!r} ({exc.strerror or exc})") from None
        for version in versions:
            try:
                raw = durable.read_folder(root, Path(name, version), (CONFIG_FILE,), max_bytes).get(CONFIG_FILE)
                header = json.loads(raw).get("nlora_serve") if raw is not None else None
            except (OSError, ValueError, AttributeError, RecursionError, durable.StoreReadError) as exc:
                raise _Unreadable(f"cannot read {name}/{version}/{CONFIG_FILE} ({exc})") from None
            family = header.get("family") if isinstance(header, dict) else None
            if isinstance(family, str):
                used.add(family)
    return used
