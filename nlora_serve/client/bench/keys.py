"""Which API key each bench request sends: ``--keys-file`` maps tenants (adapter names) to their
own keys, so one run load-tests several customers under auth as each of them, not as an admin.

    {"acme": "sk-acme-...", "globex": "sk-globex-..."}

A request on a tenant the file names sends that tenant's key; the base model's requests and the
tenants it does not name send ``--api-key``. The file is read once, before any request; its keys
are never printed or written to the result JSON (its path is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from nlora_serve.client.messages import check_api_key
from nlora_serve.client.types import InvalidInput


def read_keys_file(path: str | os.PathLike) -> dict[str, str]:
    """The ``{tenant: key}`` object of a JSON ``--keys-file``.

    Raises:
        OSError: the file cannot be read.
        ValueError: not JSON, not an object of non-empty strings, or a key that an
            ``authorization`` header cannot carry (named by its tenant; the key is never shown).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        keys = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--keys-file {path}: not JSON ({exc})") from None
    if not isinstance(keys, dict):
        raise ValueError(f"--keys-file {path}: expected an object of tenant name -> API key, "
                         f"got a JSON {type(keys).__name__}")
    for tenant, key in keys.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"--keys-file {path}: the key of tenant {tenant!r} must be a non-empty string")
        try:
            check_api_key(key)
        except InvalidInput as exc:
            raise ValueError(f"--keys-file {path}: tenant {tenant!r}: {exc}") from None
    return keys


def check_keys_cover(keys: Mapping[str, str], tenants: tuple[str, ...], base_share: float,
                     api_key: str | None) -> None:
    """Refuse a run in which some request would send no key although a ``--keys-file`` was given
    (it would be a 401 / UNAUTHENTICATED, or run unauthenticated on a server without auth): every
    tenant of the workload is in ``keys``, and base-model requests (``base_share`` > 0, or no
    tenants) have ``api_key``, unless ``api_key`` covers the rest.

    Raises:
        ValueError: naming the tenants (or the base model) without a key.
    """
    if api_key:
        return
    missing = [t for t in tenants if t not in keys]
    if not tenants or base_share > 0:
        missing.append("(base model)")
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"--keys-file has no key for {shown}: add them, or give --api-key for the requests "
                         "it does not cover")
