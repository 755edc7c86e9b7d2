"""A start batch's journal on disk (``STORE/.start_batch.json``): a start killed before it
committed (SIGKILL, a power cut) is undone at the next open of the store, as a failed one is.

Without it, the versions a killed start wrote stayed: the next start served them and pruned the
versions they had replaced (the batch's undo, batch.py, lives only in the killed process). The
journal lists, relative to the store's root, each folder the batch will rename into place (a
version, a family's factors) and each folder it makes for one (a new name's, ``_families``). It is
rewritten whole (written and fsynced in the staging area, renamed over, the root fsynced) *before*
the rename or mkdir it announces, so every write of the batch that a crash can leave on disk is
listed; an entry whose rename never happened names a folder that is absent (or another thread's
version of that number: see :class:`Journal`). A batch that writes nothing writes no journal.
It is removed at the commit (before the removals the batch deferred: a crash after them would
undo the writes of a start whose older versions were already gone) and after an abort's undo.
:func:`recover`, run by each process's first open of the store, undoes what a journal lists
(batch.StartBatch.undo: newest first, each by one rename, durably) and then removes it. Only the
first: from then on the process holds the store's flock (lock.py), so a journal a later open of
the process finds is the process's own, of a start still open or of one committed whose journal
the disk kept (its versions served now; the next process undoes them): neither is to be undone
then. A first open that fails (a journal refused) lets the lock go at once, so that a retry is a
first open again and meets the journal too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.layout import FAMILIES, STAGING, is_version_name
from nlora_serve.adapters.names import validate_name
from nlora_serve.errors import AdapterError

log = logging.getLogger("nlora_serve.adapters.store")

JOURNAL_FILE = ".start_batch.json"  # no adapter name starts with "." (names.py): never a name's folder
_MAX_BYTES = 1 << 24  # 16 MiB: ~100 bytes an entry


class Journal:
    """The journal of one open batch on the store at ``root`` (resolved); nothing on disk until
    the first :meth:`announce`. A write announced but never made (it failed, and the batch wrote
    that number again or another thread did) is harmless unless the process is then killed and the
    folder of that number is another thread's: the start thread writes before the servers start,
    other threads after, so the two do not interleave in ``serve``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: list[dict[str, str]] = []

    def announce(self, written: Path, created: Path | None = None) -> None:
        """Durably list ``written`` (and the folder ``created`` for it) before it is made.

        Raises:
            OSError: the disk refused the journal (nothing of the write is made: the caller
                rolls it back as any failed write).
        """
        entry = {"written": written.relative_to(self.root).as_posix()}
        if created is not None:
            entry["created"] = created.relative_to(self.root).as_posix()
        body = json.dumps({"format": 1, "entries": [*self.entries, entry]}, indent=0).encode()
        staged = durable.make_temp_dir(self.root / STAGING, "journal.")
        try:
            durable.write_synced(staged / JOURNAL_FILE, body)
            durable.rename(staged / JOURNAL_FILE, self.root / JOURNAL_FILE)
            durable.fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)  # (what a crash leaves there goes at the next open)
            raise
        os.rmdir(staged)  # empty now
        self.entries.append(entry)

    def remove(self) -> bool:
        """Durably remove the journal (a no-op where nothing was announced); False, logged, where
        the disk refused: the next open of the store then undoes the batch's writes."""
        if not self.entries:
            return True
        try:
            durable.unlink(self.root / JOURNAL_FILE, missing_ok=True)
            durable.fsync_dir(self.root)
        except OSError as exc:
            log.error("could not remove the start's journal %s (%s): the next start on this store takes the "
                      "start's writes back out", self.root / JOURNAL_FILE, exc)
            return False
        self.entries.clear()
        return True


def recover(root: Path) -> int:
    """Undo the batch whose journal a killed start left in the store at ``root`` (resolved; the
    caller holds its lock and has just emptied the staging area), then remove the journal.
    Returns how many listed folders it took back out (0 without a journal).

    Raises:
        AdapterError: the journal is a link, a folder, unreadable, not this module's JSON, or
            cannot be removed (the message names its full path and the fix).
    """
    from nlora_serve.adapters.store.batch import StartBatch

    path = root / JOURNAL_FILE
    if not os.path.lexists(path):
        return 0
    fix = f"check the store (the start's versions are the newest of their names), then remove {path}"
    try:
        raw = durable.read_folder(root, Path(), (JOURNAL_FILE,), _MAX_BYTES, cap="16 MiB", full_paths=True)
        entries = json.loads(raw[JOURNAL_FILE])["entries"]
        batch = StartBatch(thread=0)
        for entry in entries:
            written, created = _checked(root, entry["written"], False), entry.get("created")
            batch.wrote(written, None if created is None else _checked(root, created, True))
    except (durable.StoreReadError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise AdapterError(f"adapter store {root}: its start journal {path} cannot be read as one ({exc}); "
                           f"{fix}") from None
    present = [p for p in batch.written if os.path.lexists(p)]
    batch.undo(root, root / STAGING)
    try:
        durable.unlink(path)
        durable.fsync_dir(root)
    except OSError as exc:
        raise AdapterError(f"adapter store {root}: cannot remove its start journal {path} ({exc.strerror or exc}); "
                           f"{fix}") from None
    log.warning("adapter store %s: a start was killed before it committed; took back what it wrote: %s",
                root, ", ".join(p.relative_to(root).as_posix() for p in present) or "nothing (none was made)")
    return len(present)


def _checked(root: Path, relative: str, is_created: bool) -> Path:
    """``root / relative`` where it is what a batch writes: ``NAME/VERSION`` or
    ``_families/KEY`` (``NAME`` or ``_families`` where ``is_created``).

    Raises:
        ValueError: it is anything else (a journal edited or forged: nothing outside is touched).
    """
    parts = relative.split("/") if isinstance(relative, str) else []
    ok = len(parts) == (1 if is_created else 2)
    if ok and parts[0] != FAMILIES:
        try:
            validate_name(parts[0])
        except AdapterError:
            ok = False
        ok = ok and (is_created or is_version_name(parts[1]))
    elif ok and not is_created:
        ok = len(parts[1]) == 64 and all(c in "0123456789abcdef" for c in parts[1])
    if not ok:
        raise ValueError(f"{relative!r:.80} is not a folder a start writes")
    return root.joinpath(*parts)
