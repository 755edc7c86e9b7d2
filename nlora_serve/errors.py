"""The one exception root for expected failures: the CLI prints these without a traceback.

Error messages quote the offending value, which a client may make megabytes long (an adapter name,
a model name, a header): :func:`shown` bounds a quoted value and :func:`capped` a whole message,
for both front ends (a small request must not buy a big reply, and gRPC's status details travel in
the trailers, which the client refuses past its metadata limit). A refusal's detail that its tenant
may not read (other tenants, their counts) goes to the server's log through :class:`RefusalLog`.
"""

import logging
import threading
import time

SHOWN_CHARS = 200  # a quoted client value at most this long
MAX_ERROR_CHARS = 1000  # a whole error message at most this long


class NloraError(Exception):
    """An expected failure whose message tells a person what is wrong and what was expected."""


class ModelError(NloraError):
    """A base model is missing, corrupt or of an unsupported architecture."""


class AdapterError(NloraError):
    """An adapter is missing, malformed, or asks for something this server cannot serve exactly."""


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` as an error message quotes it: at most ``limit`` characters, then "..."."""
    return text if len(text) <= limit else text[:limit] + "..."


def capped(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut to ``limit`` characters, saying how long it was."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... (message cut: {len(message)} characters)"


# a tenant's refusals of one kind are logged at most once per this many seconds (RefusalLog)
REFUSAL_LOG_SECONDS = 10.0


class RefusalLog:
    """A logger's INFO lines about refused requests (the detail a tenant's refusal leaves out:
    other tenants, counts), at most one per key (a kind of refusal and a tenant) every
    :data:`REFUSAL_LOG_SECONDS`: an overload, or a client retrying in a loop, would otherwise write
    a line per request. A line says how many refusals of its key went unlogged since the last.
    Thread-safe."""

    def __init__(self, logger: logging.Logger):
        self._log = logger
        self._last: dict[tuple, tuple[float, int]] = {}  # key -> (monotonic time of its last line, refusals since)
        self._lock = threading.Lock()

    def info(self, key: tuple, message: str, *args, extra: dict | None = None) -> None:
        """Log ``message % args`` at INFO (with logging's ``extra``) unless ``key`` was logged less
        than REFUSAL_LOG_SECONDS ago."""
        now = time.monotonic()
        with self._lock:
            last, unlogged = self._last.get(key, (None, 0))
            if last is not None and now - last < REFUSAL_LOG_SECONDS:
                self._last[key] = (last, unlogged + 1)
                return
            self._last[key] = (now, 0)
        if unlogged:
            message, args = message + " (%d more like it since the last line)", (*args, unlogged)
        self._log.info(message, *args, extra=extra)
