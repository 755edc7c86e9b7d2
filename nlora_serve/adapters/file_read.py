"""An adapter folder's files read whole into memory with read(2): never memory-mapped, never
blocking, nothing opened but a regular file; and a folder refused before any of its files is read
when one is no regular file or they are over --max-adapter-bytes together (:func:`check_folder`).
Torch-free (config.py reads adapter_config.json here).

Why not a mapping: safetensors' ``safe_open`` maps the file, and a page of a mapping past the end of
a file truncated meanwhile raises SIGBUS on access, which kills the process; a read of such a file
returns fewer bytes, which the parsers refuse naming it. Why the type check before the open: a
FIFO planted as ``adapter_config.json`` blocked its read forever (an ``adapters inspect``, or an
admin's ``/v1/load_lora_adapter`` thread), and opening a device can act on it (a tape rewinds).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.errors import AdapterError

# an adapter folder's files (PEFT's names), the only ones read from it or kept of it in the store
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALLOWED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def open_regular(path: Path, expected: str) -> int:
    """A read-only descriptor of ``path`` once it is a regular file (links followed: an
    operator's folder may link its files), checked before the open and again on the open file.

    Raises:
        AdapterError: naming ``path`` and ``expected`` (what it should be): a FIFO, device, folder
            or other non-regular file; OSError: it cannot be opened (missing, EACCES).
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device is never opened
        raise AdapterError(f"{path}: not a regular file; expected {expected}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: one swapped in since cannot block
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterError(f"{path}: not a regular file; expected {expected}")
    return fd


def read_file(path: Path, max_bytes: int | None = DEFAULT_MAX_ADAPTER_BYTES,
              expected: str = "a safetensors file") -> bytes:
    """The whole of adapter file ``path``: its size (fstat) checked against ``max_bytes``
    (--max-adapter-bytes; None: no cap, the offline tools' reads of an operator's own folders)
    before a byte is read; a file grown since is read to that size, one truncated gives fewer bytes.

    Raises:
        AdapterError: naming ``path``: over ``max_bytes``, not a regular file, or unreadable
            (missing, EACCES, EIO).
    """
    try:
        with open(open_regular(path, expected), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise AdapterError(f"{path}: {size} bytes, over the {max_bytes} bytes an adapter's files "
                                   "may hold (--max-adapter-bytes): refusing to read it")
            return f.read(size)
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def check_folder(adapter_dir: Path, max_bytes: int) -> None:
    """Refuse, before reading anything, an adapter folder whose files are no regular files
    (:func:`_check_regular`) or are over ``max_bytes`` (--max-adapter-bytes) together.

    Raises:
        AdapterError: naming the folder and the file or the sizes.
    """
    total = _check_regular(Path(adapter_dir))
    if total > max_bytes:
        raise AdapterError(f"{adapter_dir}: {' + '.join(ALLOWED_FILES)} are {total} bytes, over the server's "
                           f"--max-adapter-bytes {max_bytes}")


def _check_regular(adapter_dir: Path) -> int:
    """Refuse an adapter file of ``adapter_dir`` that exists but is no regular file (links to one
    are fine: a Hugging Face snapshot's files are links to its blobs). A FIFO would block its
    reader for good, and a link to /dev/zero or /dev/urandom would be read until memory runs out.
    Returns the bytes of those files together (missing ones count 0).

    Raises:
        AdapterError: naming the file and what it is.
    """
    total = 0
    for file in ALLOWED_FILES:
        try:
            found = (adapter_dir / file).stat()
        except (OSError, ValueError):  # missing (the readers name it), or not statable
            continue
        mode = found.st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
            raise AdapterError(f"{adapter_dir}: {file} is {kind}, not a regular file; an adapter folder holds "
                               f"{' and '.join(ALLOWED_FILES)} as files (or links to files)")
        total += found.st_size
    return total
