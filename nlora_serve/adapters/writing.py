"""Adapter directory writing: every file via a temp file, fsync and rename (never half-written),
and a command's whole output all or nothing (:class:`Undo`).

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT layout). The
offline tools (``adapters init | convert | tune | compress``) check every output folder with
:func:`check_out_dir` before any work, and write them under one :class:`Undo`, so a refusal, a full
disk or a read-only folder leaves nothing of theirs behind (and nothing that was there is touched).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from nlora_serve.adapters.config import CONFIG_NAME
from nlora_serve.adapters.format import WEIGHTS_NAME
from nlora_serve.adapters.store.base_record import BASE_FILE
from nlora_serve.adapters.store.layout import STAGING
from nlora_serve.errors import AdapterError


def atomic_write(path: Path, write, *, replace: bool = True) -> None:
    """Write via a temp file in the same directory, fsync, rename: never a half-written file.

    ``replace`` False: ``path`` must not exist, and that is checked in the same step that puts the
    file there (a hard link), so a file another writer put there meanwhile is never overwritten.

    Raises:
        FileExistsError: ``replace`` is False and ``path`` exists. OSError: the write failed.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an adapter is a shareable artefact
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _place_new(tmp: str, path: Path) -> None:
    """``tmp`` becomes ``path``, which must not exist (the temp file stays for the caller to remove)."""
    try:
        os.link(tmp, path)  # fails with FileExistsError rather than overwrite
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)


class Undo:
    """The files and folders one command created, removed again if the command fails.

    ``with Undo() as undo: write_dir(a, ..., undo=undo); write_dir(b, ..., undo=undo)``: an
    exception inside the block removes everything recorded, newest first, then propagates. Files
    are recorded once this command has written them, folders where this command created them; a
    folder is removed only once empty, so whatever anyone else put in it meanwhile (another run
    writing into the same new --out) stays, with the folder.
    """

    def __init__(self) -> None:
        self._paths: list[Path] = []

    def created(self, path: Path) -> None:
        """Record ``path``: a file this command wrote, or a folder it is about to create."""
        self._paths.append(Path(path))

    def adopt(self, other: Undo) -> None:
        """Take over ``other``'s records (a finished step's output becomes this command's)."""
        self._paths += other._paths
        other._paths = []

    def rollback(self) -> None:
        """Remove every recorded file and every recorded folder left empty, newest first; a path
        already gone, or a folder someone else wrote into, is skipped."""
        for path in reversed(self._paths):
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()  # only when empty
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                pass  # best effort: the command's own error is the one to report
        self._paths = []

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None:
            self.rollback()
        return False


def check_out_dir(out_dir: Path, what: str = "--out") -> None:
    """Refuse, before any work, an output folder :func:`write_dir` would fail on.

    Args:
        what: how the messages name the folder (the option, or ``member 'x' folder``).

    Raises:
        AdapterError: naming ``what``: the path or a parent of it is a file, the nearest existing
            folder is not writable (a read-only file system, no permission), or the folder already
            holds adapter_config.json or adapter_model.safetensors, or it lies inside an adapter
            store (:func:`store_around`).
    """
    out_dir = Path(out_dir)
    store = store_around(out_dir)
    if store is not None:
        raise AdapterError(f"{what} {out_dir} is inside the adapter store {store} (it holds {BASE_FILE} or "
                           f"{STAGING}): only a server (adapters upload / load) and adapters rollback write a store, "
                           "and a folder written into it by hand is served at the next start as a version no one "
                           "registered, counted against --keep-versions (an older kept version is deleted); write it "
                           "elsewhere, then `nlora-serve adapters upload`")
    for folder in (out_dir, *out_dir.parents):
        if os.path.lexists(folder):
            if not folder.is_dir():
                where = "" if folder == out_dir else f": {folder}"
                kind = "a link to nothing" if folder.is_symlink() and not folder.exists() else "a file"
                raise AdapterError(f"{what} {out_dir}{where} is {kind}, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise AdapterError(f"{what} {out_dir}: cannot write into {folder} (read-only or no permission)")
            break
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if os.path.lexists(out_dir / name):
            raise AdapterError(f"{what} {out_dir} already holds an adapter ({name}); refusing to overwrite it")


def store_around(folder: Path) -> Path | None:
    """The adapter store (an ``--adapter-dir``: the folder holding its ``.base_model.json`` or
    ``.staging``) that ``folder`` would be written into, or None. Links are resolved: a link into a
    store is inside it.

    Args:
        folder: a path that may not exist yet (its nearest existing folder is resolved).
    """
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), Path("."))
    try:
        resolved = existing.resolve()
    except (OSError, RuntimeError):  # a link loop: check_out_dir names what it is
        return None
    for root in (resolved, *resolved.parents):
        if os.path.lexists(root / BASE_FILE) or os.path.isdir(root / STAGING):
            return root
    return None


def make_dirs(folder: Path, undo: Undo) -> None:
    """``folder`` and its missing parents, each one created recorded in ``undo`` (outermost first).

    Raises:
        OSError: as :meth:`Path.mkdir`.
    """
    folder = Path(folder)
    missing = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        undo.created(p)
    folder.mkdir(parents=True, exist_ok=True)


def write_dir(out_dir: Path, config: dict, tensors: dict[str, torch.Tensor], *, undo: Undo | None = None) -> Path:
    """Write ``config`` and ``tensors`` as a PEFT-style adapter directory, all or nothing.

    Args:
        out_dir: created (with its parents) if missing; must not already hold an adapter.
        config: the adapter_config.json object.
        tensors: file key -> tensor (written contiguous, in its dtype).
        undo: where to record what was created, so a later failure of the same command removes it.

    Raises:
        AdapterError: as :func:`check_out_dir`, or the folder cannot be created or written (disk
            full, a file too large): named, with whatever this call created removed again.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, "adapter folder")
    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    mine = Undo()
    try:
        with mine:
            make_dirs(out_dir, mine)
            for name, write in ((WEIGHTS_NAME, lambda p: save_file(data, p, metadata={"format": "pt"})),
                                (CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))):
                atomic_write(out_dir / name, write, replace=False)
                mine.created(out_dir / name)
    except (OSError, SafetensorError) as exc:
        raise AdapterError(f"{out_dir}: cannot write the adapter ({_reason(exc)})") from None
    if undo is not None:
        undo.adopt(mine)
    return out_dir


def _reason(exc: Exception) -> str:
    """An OSError's strerror (``No space left on device``), else the exception's text."""
    return getattr(exc, "strerror", None) or str(exc)
