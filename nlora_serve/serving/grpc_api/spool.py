"""An upload's bytes as they arrive on the event loop, kept in an anonymous in-memory file, so
that the worker thread turns them into one ``bytes`` without holding the GIL.

UploadAdapter gathered its chunks in a ``bytearray`` and copied it into ``bytes`` in a worker
thread; but a copy of a Python buffer holds the GIL throughout, so the event loop (every stream of
every tenant) waited for it anyway: 0.16-0.26 s for an upload at the 256 MiB ``--max-adapter-bytes``
on 2 cores, 0.27-0.75 s for the copy alone on a loaded box. A read from a file into a new ``bytes``
releases the GIL while the kernel copies (and faults the pages in): the loop then waited 8-22 ms.
"""

from __future__ import annotations

import os
import tempfile


class Spool:
    """Bytes appended on the event loop (each append a write into the file: the loop thread is busy
    for the copy of that chunk alone), read back whole in a worker thread. Linux: a memfd (RAM,
    nothing on disk); elsewhere a temporary file. Not thread-safe: append, then read, then close.
    """

    def __init__(self) -> None:
        if hasattr(os, "memfd_create"):
            self._file = open(os.memfd_create("nlora-upload", os.MFD_CLOEXEC), "w+b")
        else:
            self._file = tempfile.TemporaryFile()
        self.size = 0  # bytes appended so far

    def append(self, chunk: bytes) -> None:
        """Append ``chunk`` (all of it: a short write is retried by the buffered file)."""
        self._file.write(chunk)
        self.size += len(chunk)

    def read(self) -> bytes:
        """Everything appended, as one ``bytes`` of :attr:`size` (call from a worker thread; the
        GIL is released while the kernel copies)."""
        self._file.flush()
        self._file.seek(0)
        data = self._file.read(self.size)
        if len(data) != self.size:  # never short on a memfd or a regular file: no short upload is served
            raise OSError(f"upload spool: read {len(data)} of {self.size} bytes")
        return data

    def close(self) -> None:
        """Free the file's memory (idempotent)."""
        self._file.close()
