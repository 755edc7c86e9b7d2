"""Adapter names: the one pattern every store path and API name must match (DESIGN §3)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from nlora_serve.errors import AdapterError, shown

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_PATTERN)


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it is a valid adapter name.

    A name is 1-128 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit, so it can
    never be absolute, start with ``.`` (``.``, ``..``, hidden files) or contain a path separator.

    Raises:
        AdapterError: the name does not match :data:`NAME_PATTERN` (message quotes it, shortened
            by :func:`~nlora_serve.errors.shown`, and names the pattern).
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        quoted = repr(shown(name)) if isinstance(name, str) else repr(name)
        length = f" ({len(name):,} characters)" if isinstance(name, str) and len(name) > 128 else ""
        raise AdapterError(f"adapter name {quoted}{length} is not valid: expected {NAME_PATTERN} "
                           "(1-128 letters, digits, '.', '_', '-', starting with a letter or digit)")
    return name


def check_no_case_twin(name: str, taken: Iterable[str]) -> None:
    """Refuse ``name`` when a name in ``taken`` differs from it only in case: on a case-insensitive
    file system (macOS, Windows) both are one folder of the store, so only one may exist.

    Raises:
        AdapterError: naming both and what to do instead.
    """
    folded = name.casefold()
    twin = next((t for t in taken if t != name and t.casefold() == folded), None)
    if twin is not None:
        raise AdapterError(f"adapter name {name!r} differs only in case from the stored adapter {twin!r}: on a "
                           "case-insensitive file system both are one folder of the store; register it under "
                           f"another name, or as a new version of {twin!r}")
