"""A stored version's recorded content hashes: ``SHA256SUMS`` in its folder.

The store writes it with the version's files, in the same staged, fsynced folder that one rename
makes visible (writes.py), so a version on disk has its hashes from the moment it exists. Every
read of the version's files through the store checks them: a file replaced since it was written
(another valid adapter copied over it between restarts, a restored backup of another version) was
served at the next start under a fresh content hash, silently; now that version is refused with
:class:`StoredHashMismatch`, naming the adapter, the file and both hashes, and nothing on disk is
touched. So is a hot-swap whose new version would hard-link such a file (:func:`check_linked`),
and a folder of the store registered by its path (HTTP's lora_path): no path records a replaced
file as the store's. It guards against replaced or corrupted files, not an attacker who may write
the store (they can rewrite the hashes too).

Format: ``sha256sum``'s, one ``<64 lowercase hex>  <file name>`` line per file, names sorted, so
``cd <version folder> && sha256sum -c SHA256SUMS`` checks a version by hand. Read strictly: what
the store writes (CRLF line ends pass); sha256sum's binary-mode ``*name``, uppercase hex, blank
or repeated lines are refused as malformed. Names other than the version's files are ignored.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from nlora_serve.adapters.store import durable
from nlora_serve.errors import AdapterError

log = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"
MAX_SUMS_BYTES = 4096  # a version's SHA256SUMS: two lines of ~90 bytes; more is refused unread


class StoredHashMismatch(AdapterError):
    """A stored version's file is not what the store wrote: its sha256 differs from the one
    recorded in the version's SHA256SUMS (or is not recorded there). The version is refused."""


def sums_bytes(files: dict[str, bytes]) -> bytes:
    """The SHA256SUMS of ``files`` (file name -> bytes): ``<sha256 hex>  <name>\\n`` per file, names sorted."""
    return "".join(f"{hashlib.sha256(files[f]).hexdigest()}  {f}\n" for f in sorted(files)).encode()


def parse_sums(data: bytes, path: Path) -> dict[str, str]:
    """File name -> sha256 hex of a SHA256SUMS file's bytes (``path``: where it was read, for the error).

    Raises:
        StoredHashMismatch: not the format :func:`sums_bytes` writes (the version is refused).
    """
    sums = {}
    try:
        for line in data.decode("ascii").splitlines():
            digest, name = line.split("  ", 1)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or name in sums:
                raise ValueError(line)
            sums[name] = digest
    except ValueError as exc:  # (UnicodeDecodeError is one)
        raise StoredHashMismatch(f"{path}: not a SHA256SUMS file as the store writes it ({str(exc)!r:.80}); "
                                 "refusing the version, whose files cannot be checked; nothing on disk was "
                                 "changed") from None
    return sums


def recorded(root: Path, folder: Path) -> dict[str, str] | None:
    """What the SHA256SUMS of version folder ``root/folder`` (``folder`` relative to the store's
    root) records, read as the store reads a version (no link followed, capped at
    :data:`MAX_SUMS_BYTES`); None where it has none (a version an older nlora-serve wrote).

    Raises:
        FileNotFoundError: the folder does not exist.
        AdapterError: a link or not a regular file, or over the cap. StoredHashMismatch: malformed.
    """
    found = durable.read_folder(root, folder, (SUMS_FILE,), MAX_SUMS_BYTES,
                                f"the {MAX_SUMS_BYTES} bytes a {SUMS_FILE} may hold")
    return parse_sums(found[SUMS_FILE], root / folder / SUMS_FILE) if found else None


def check_sums(name: str, folder: Path, files: dict[str, bytes], sums: dict[str, str]) -> None:
    """Check each of ``files`` (read from version folder ``folder`` of adapter ``name``) against
    ``sums`` (:func:`parse_sums`).

    Raises:
        StoredHashMismatch: a file whose sha256 is not the recorded one, or is not recorded;
            the message names the adapter, the file, the expected and the found sha256.
    """
    for fname in sorted(files):
        found, expected = hashlib.sha256(files[fname]).hexdigest(), sums.get(fname)
        if found != expected:
            recorded = f"the store recorded sha256 {expected}" if expected else "the store recorded no sha256 for it"
            raise StoredHashMismatch(
                f"adapter {name!r}: its stored file {folder / fname} has sha256 {found}, "
                f"but {recorded} in {SUMS_FILE} when it wrote the version: the file was replaced or changed "
                "since: refusing this version. Nothing on disk was changed; put the original file back, or "
                "upload the adapter again")


def check_linked(root: Path, name: str, same_as: dict[str, Path], linked: dict[str, bytes]) -> None:
    """Check the bytes ``linked`` (file name -> bytes) of files a new version of adapter ``name``
    hard-links from earlier versions (``same_as``: file name -> that file's path in the store
    ``root``) against the sums their own versions recorded, before the new version's SHA256SUMS
    records them: a hot-swap linking a config replaced on disk since would otherwise record the
    replacement as what the store wrote, and the next start would serve it unchecked.

    Raises:
        StoredHashMismatch: a linked file is not the one its version recorded (the write is refused).
    """
    for fname, source in same_as.items():
        sums = recorded(root, source.parent.relative_to(root))
        if sums is not None:  # (an older nlora-serve's version: nothing to check against)
            check_sums(name, source.parent, {fname: linked[fname]}, sums)


def record(staging: Path, folder: Path, files: dict[str, bytes]) -> bool:
    """Write the SHA256SUMS of ``files`` into version folder ``folder`` where it has none (a
    version an older nlora-serve wrote, once its files were read and validated), so that from
    then on a file replaced there is refused, as in a version written with its sums. Durable as
    a version: written and fsynced in a folder of ``staging`` (the store's staging area), renamed
    into ``folder``, ``folder`` fsynced. The caller holds the store's write lock.

    Best effort: should the disk refuse it (or the version be removed meanwhile), the version
    stays as it was (served, unchecked until a restart records its sums), with a warning, and
    False is returned (True: recorded, or there already).
    """
    if (folder / SUMS_FILE).exists() or (folder / SUMS_FILE).is_symlink():
        return True
    staged = None
    try:
        staged = durable.make_temp_dir(staging, "sums.")
        durable.write_synced(staged / SUMS_FILE, sums_bytes(files))
        durable.rename(staged / SUMS_FILE, folder / SUMS_FILE)
        durable.fsync_dir(folder)
        return True
    except OSError as exc:
        log.warning("could not record the sha256 of the files of %s in its %s (%s); it serves, unchecked "
                    "until a restart records them", folder, SUMS_FILE, exc.strerror or exc)
        return False
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
