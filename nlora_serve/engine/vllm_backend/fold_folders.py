"""The vLLM backend's fold folder: where it writes each adapter version folded to plain LoRA for
vLLM to load (engine.py), one per serving process, and how folders of dead processes are swept.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

FOLD_PREFIX = "nlora-vllm-loras-"
FOLD_LOCK = ".owner.lock"  # held (flock) by the serving process for the folder's whole life


def fold_folder() -> tuple[Path, int]:
    """A new temporary folder for this process's folded LoRAs, ``nlora-vllm-loras-<pid>-*``, and
    the descriptor of the lock it holds on it, after removing the folders whose owner is gone (a
    kill -9 or an OOM kill leaves its folder: a restart loop would fill the disk, or a tmpfs's
    memory).

    An owner is gone when its folder's lock can be taken: a kernel lock, released when the process
    dies, whatever PID namespace or container it ran in (a pid in the name only helps a human: two
    containers sharing /tmp see each other's pids as dead). A folder without the lock file (being
    created, or of an older version) is left alone.
    """
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{FOLD_PREFIX}*"):
        _remove_if_abandoned(old)
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLD_PREFIX}{os.getpid()}-"))
    lock = os.open(folder / FOLD_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the folder is new: nobody else holds it
    return folder, lock


def _remove_if_abandoned(folder: Path) -> None:
    try:
        lock = os.open(folder / FOLD_LOCK, os.O_RDWR)
    except OSError:  # no lock file (not ours to judge), or not ours to open
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # its owner runs
        os.close(lock)
        return
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(lock)


def release_fold_folder(folder: Path, lock: int) -> None:
    """Remove this process's fold folder, then drop its lock (a second call does nothing more)."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(lock)
