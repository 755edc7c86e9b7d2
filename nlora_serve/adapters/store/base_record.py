"""Which base model an adapter store is for: ``.base_model.json`` at its root.

An adapter fits the base model it was made for (its shapes, its layers, a tied tenant's slices
of that model's weights), so a store serves one base model. Before, nothing said which: ``serve
--model OTHER`` on ``make serve``'s store skipped every stored adapter with a warning, wrote new
versions of the names it registered over theirs, and a restart on the first model warned and
wrote them over again (h141). Now the store records the model's fingerprint (sha256 of its
weights, ``BaseModel.fingerprint``) with the first version written into it (a start's
registrations: once the start succeeded), and an :class:`~nlora_serve.adapters.runtime.manager.AdapterManager` on another model refuses it, naming
both models and the fix (another ``--adapter-dir``). A store that holds no adapter (no version, no
family factors) takes the new model instead.

A store an older nlora-serve wrote has no record: it serves on, and is adopted (the record
written with its next version) where at least one of its adapters loaded on the model
(:func:`adopt_after_restore`), unless the configs of its newest versions name another base model
(tied IntTune tenants and compressed family members record their base's fingerprint; a PEFT LoRA
records none): then it is refused as a recorded store would be. Where none loaded (a store of
another model's PEFT LoRAs), it is left unrecorded, so that its own model is not refused later.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.adapters.file_read import CONFIG_FILE
from nlora_serve.adapters.store import durable
from nlora_serve.adapters.store.layout import FAMILIES, STAGING, is_version_name
from nlora_serve.errors import AdapterError

log = logging.getLogger("nlora_serve.adapters.store")

BASE_FILE = ".base_model.json"  # no adapter name starts with "." (names.py): never a name's folder
FORMAT = 1
_MAX_BYTES = 1 << 16  # the record is ~200 bytes; a larger file is not one


@dataclass(frozen=True, slots=True)
class BaseIdentity:
    """A base model as a store records it: ``fingerprint`` (64 hex, what decides) and ``model``
    (the model's folder, only to name it in messages)."""

    fingerprint: str
    model: str

    def shown(self) -> str:
        return f"{self.model} (fingerprint {self.fingerprint[:16]}…)"


def read_record(root: Path) -> BaseIdentity | None:
    """The base model recorded in the store at ``root`` (resolved), or None where it has no record.

    Raises:
        AdapterError: the record is a link, not a regular file, unreadable or not the JSON this
            module writes (the message names the file and how to recover).
    """
    try:
        data = durable.read_folder(root, Path(), (BASE_FILE,), _MAX_BYTES, cap=f"{_MAX_BYTES} bytes", full_paths=True)
    except durable.StoreReadError as exc:
        raise AdapterError(f"{exc}; it should hold the store's base-model record: remove it and the next start "
                           "records the model it serves") from None
    if BASE_FILE not in data:
        return None
    try:
        record = json.loads(data[BASE_FILE])
        fingerprint, model = record["fingerprint"], record.get("model", "?")
        if not (_is_fingerprint(fingerprint) and isinstance(model, str)):  # str() took null as "None"
            raise ValueError(BASE_FILE)
        identity = BaseIdentity(fingerprint, model)
    except (ValueError, TypeError, KeyError, RecursionError):
        raise AdapterError(f"adapter store {root}: {BASE_FILE} is not a base-model record (JSON with a "
                           "'fingerprint'); remove it and the next start records the model it serves") from None
    return identity


def _is_fingerprint(value: object) -> bool:
    """Whether ``value`` is a fingerprint as :func:`write_record` writes one: 64 hex characters."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def check_base(store, identity: BaseIdentity) -> None:
    """Check that ``store`` (an AdapterStore) is for the base model ``identity``, and set
    ``store.base_pending`` to ``identity`` where its record must still be written (no record, or
    the record of another model in a store that holds no adapter). Reads only: nothing is written.

    Raises:
        AdapterError: the store is another base model's (its record, or for a store without one
            the configs of its adapters, say so), naming both models and the fix.
    """
    record = read_record(store.root)
    if record is not None and record.fingerprint == identity.fingerprint:
        return
    fix = ("adapters of one base model do not fit another: give this model a store of its own "
           "(--adapter-dir ANOTHER_DIR), or serve the store's model on it")
    if record is not None:
        if _holds_adapters(store.root):
            raise AdapterError(f"adapter store {store.root} is for base model {record.shown()}, not "
                               f"{identity.shown()}: {fix}")
        log.info("adapter store %s holds no adapter: taking it for base model %s (it was for %s)",
                 store.root, identity.shown(), record.shown())
    else:
        made_for = _config_fingerprints(store.root)
        if made_for and identity.fingerprint not in made_for:
            fingerprint, names = next(iter(made_for.items()))
            raise AdapterError(f"adapter store {store.root} holds adapters made for another base model (fingerprint "
                               f"{fingerprint[:16]}…, in the configs of {', '.join(names[:3])}"
                               f"{', ...' if len(names) > 3 else ''}), not {identity.shown()}: {fix}")
    store.base_pending = identity


def adopt_after_restore(store, restored: int) -> None:
    """After the registry's scan of ``store`` restored ``restored`` adapters: a store without a
    record (an older nlora-serve's) that holds adapters, none of which loaded, is not recorded as
    this model's (``store.base_pending`` cleared, a warning logged): they are likely another
    model's PEFT LoRAs, which name no base, and recording this model would refuse theirs later."""
    if store.base_pending is None or restored or read_record(store.root) is not None \
            or not _holds_adapters(store.root):
        return
    log.warning("adapter store %s has no base-model record (an older nlora-serve wrote it) and none of its adapters "
                "loads on %s: not recording this model as its base; if the store is another model's, give this one "
                "a store of its own (--adapter-dir)", store.root, store.base_pending.shown())
    store.base_pending = None


def write_record(root: Path, identity: BaseIdentity) -> None:
    """Durably (re)write the store's record of ``identity``: written and fsynced in the staging
    area, renamed over ``BASE_FILE``, the root fsynced. The caller holds the store's write lock.

    Raises:
        OSError: the disk refused it (the record is as before).
    """
    from nlora_serve import __version__

    body = {"format": FORMAT, "fingerprint": identity.fingerprint, "model": identity.model,
            "written_by": f"nlora-serve {__version__}"}
    staged = durable.make_temp_dir(root / STAGING, "base.")
    try:
        durable.write_synced(staged / BASE_FILE, (json.dumps(body, indent=1) + "\n").encode())
        durable.rename(staged / BASE_FILE, root / BASE_FILE)
        durable.fsync_dir(root)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _holds_adapters(root: Path) -> bool:
    """Whether the store holds any adapter: a name with a version folder (named as layout.py names
    them: another subfolder of a name's folder is no version, and the registry serves none), or a
    family's factors (a folder under ``_families``). A folder that cannot be read (EACCES, EIO) may
    hold one: counted as holding (nothing is taken for another model on a guess)."""
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name in (STAGING, BASE_FILE) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                with os.scandir(entry.path) as inner:
                    if any((entry.name == FAMILIES or is_version_name(e.name)) and e.is_dir(follow_symlinks=False)
                           for e in inner):
                        return True
            except OSError:
                return True
    return False


def _config_fingerprints(root: Path) -> dict[str, list[str]]:
    """The base fingerprints the configs of each name's newest version record (tied tenants,
    family members), each with the names recording it; names whose config records none (PEFT
    LoRAs) or cannot be read are left out (the registry's scan names what is wrong with those)."""
    found: dict[str, list[str]] = {}
    with os.scandir(root) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        if entry.name in (STAGING, FAMILIES, BASE_FILE) or not entry.is_dir(follow_symlinks=False):
            continue
        try:  # EACCES, EIO: skipped here as by the registry's scan (reads.py), which warns
            with os.scandir(entry.path) as inner:
                versions = sorted(e.name for e in inner if is_version_name(e.name))
        except OSError:
            continue
        if not versions:
            continue
        try:
            raw = durable.read_folder(root, Path(entry.name, versions[-1]), (CONFIG_FILE,), _MAX_BYTES)
            header = json.loads(raw.get(CONFIG_FILE, b"{}")).get("nlora_serve")
        except (OSError, AdapterError, ValueError, AttributeError, RecursionError):
            continue
        fingerprint = header.get("base_fingerprint") if isinstance(header, dict) else None
        if isinstance(fingerprint, str) and fingerprint:
            found.setdefault(fingerprint, []).append(entry.name)
    return found
