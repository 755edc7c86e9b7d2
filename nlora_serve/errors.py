"""The one exception root for expected failures: the CLI prints these without a traceback.

Error messages quote the offending value, which a client may make megabytes long (an adapter name,
a model name, a header): :func:`shown` bounds a quoted value and :func:`capped` a whole message,
for both front ends (a small request must not buy a big reply, and gRPC's status details travel in
the trailers, which the client refuses past its metadata limit).
"""

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
