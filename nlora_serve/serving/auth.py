"""Multi-tenant API keys: who is calling, and may they use this adapter (DESIGN §6).

The tenants file (``serving/tenants_file.py``: its format and checks) stores only sha256 hashes of
keys; each names a tenant (its adapters, ``base_model``, ``weight``, ``max_concurrent_requests``) or an
admin, who may call every RPC and use every adapter. Keys travel as ``authorization: Bearer <key>``
metadata; make them random (``python -m nlora_serve.serving.commands.keys new``), since a hash only
protects a key that cannot be guessed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

from nlora_serve.errors import NloraError, shown

_BEARER = "bearer "
KEY_ID_HEX = 8  # hex digits of a key's sha256 that name it in log lines (key_id)


class AuthError(NloraError):
    """The tenants file is malformed (the message names the entry and field)."""


class Unauthenticated(NloraError):
    """No key, or a key that matches nobody (gRPC UNAUTHENTICATED)."""


class PermissionDenied(NloraError):
    """A known key asking for what it was not granted (gRPC PERMISSION_DENIED)."""


def hash_key(key: str) -> str:
    """sha256 hex of an API key, as stored in the tenants file."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller behind one key."""

    name: str  # tenant or admin name from the tenants file ("local" without auth)
    is_admin: bool
    adapters: tuple[str, ...] = ()  # granted names or fnmatch patterns (ignored for admins)
    base_model: bool = False  # may generate without an adapter
    weight: float = 1.0  # share of the server under fair scheduling, relative to other tenants
    max_concurrent_requests: int | None = None  # its requests running or waiting at most (None: no quota)
    # the first 8 hex digits of this key's sha256 ("" without auth): which of a tenant's keys sent a
    # request, in the request log (a rotation is done when the old key's id stops appearing); not
    # part of the identity (several keys of one tenant are one tenant)
    key_id: str = dataclass_field(default="", compare=False)

    def may_use(self, adapter: str | None) -> bool:
        """True when this caller may run on ``adapter`` (None = the base model)."""
        if self.is_admin:
            return True
        if adapter is None:
            return self.base_model
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)

    def check(self, adapter: str | None) -> None:
        """Raises PermissionDenied unless :meth:`may_use`."""
        if not self.may_use(adapter):
            what = f"adapter {shown(adapter)!r}" if adapter is not None else "the base model (no adapter)"
            raise PermissionDenied(f"key of {self.name!r} is not granted {what}")

    def require_admin(self, rpc: str) -> None:
        """Raises PermissionDenied unless this is an admin key."""
        if not self.is_admin:
            raise PermissionDenied(f"{rpc} needs an admin key; {self.name!r} is a tenant key")


LOCAL_ADMIN = Principal("local", is_admin=True)


class Authenticator:
    """Maps presented keys to principals. ``Authenticator(None)`` is the no-auth mode: every
    caller is :data:`LOCAL_ADMIN` (the server then binds to loopback only).
    """

    def __init__(self, by_hash: dict[str, Principal] | None):
        # (digest -> principal, digest -> the stored digest object, for compare_digest): one attribute,
        # so that a reload (:meth:`replace_keys`) swaps both at once
        self._keys = (by_hash, {d: d for d in by_hash or {}})

    def weights(self) -> dict[str, float]:
        """Tenant name -> fair-scheduling weight, for every tenant whose weight is not 1."""
        return {p.name: p.weight for p in (self._keys[0] or {}).values() if p.weight != 1.0}

    def entries(self) -> dict[str, tuple[Principal, frozenset[str]]]:
        """Name -> (its principal, the sha256 digests of its keys), admins and tenants alike."""
        digests: dict[str, set[str]] = {}
        principals: dict[str, Principal] = {}
        for digest, principal in (self._keys[0] or {}).items():
            principals[principal.name] = principal
            digests.setdefault(principal.name, set()).add(digest)
        return {name: (principal, frozenset(digests[name])) for name, principal in principals.items()}

    def principals(self) -> list[Principal]:
        """Every key's principal (its ``key_id`` set), in the file's order: admin_keys, then tenants;
        [] with auth off. ``keys list`` prints these: never a key nor its whole sha256."""
        return list((self._keys[0] or {}).values())

    def replace_keys(self, other: Authenticator) -> None:
        """Serve ``other``'s keys from now on (a tenants-file reload): every holder of this object
        (both front ends, the gRPC interceptor) authenticates its next call against them; a
        principal already returned stays as it was.

        Raises:
            ValueError: one of the two has auth off (turning auth on or off at runtime is refused).
        """
        if not (self.enabled and other.enabled):
            raise ValueError("a tenants-file reload needs auth on before and after")
        self._keys = other._keys

    @property
    def enabled(self) -> bool:
        return self._keys[0] is not None

    @classmethod
    def from_file(cls, path: str | Path) -> Authenticator:
        """Read a tenants file (:func:`nlora_serve.serving.tenants_file.read`: its format and checks).

        Raises:
            AuthError: the file is unreadable or malformed (the message names the entry and field).
        """
        from nlora_serve.serving import tenants_file  # it builds this module's Principals

        return cls(tenants_file.read(path))

    @classmethod
    def from_document(cls, doc: object, path: str | Path) -> Authenticator:
        """A tenants file's parsed contents, checked as :meth:`from_file` checks them (``path`` names
        the source in messages; ``keys new --tenant`` checks the entry it prints here).

        Raises:
            AuthError: as :meth:`from_file`.
        """
        from nlora_serve.serving import tenants_file

        return cls(tenants_file.parse(doc, path))

    def presented_key_id(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The id (:func:`key_id`) of the bearer key ``metadata`` carries, known or not: a refused
        call's log line names it, so that a key revoked (or mistyped) that a client still sends can be
        told apart from others. None with auth off, or without one bearer key."""
        if self._keys[0] is None:
            return None
        try:
            key = _bearer(metadata or ())
        except Unauthenticated:
            return None
        return None if key is None else key_id(hash_key(key))

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The principal of a call's ``authorization: Bearer <key>`` metadata.

        Raises:
            Unauthenticated: no bearer key, or one that matches no entry.
        """
        by_hash, digests = self._keys
        if by_hash is None:
            return LOCAL_ADMIN
        key = _bearer(metadata or ())
        if key is None:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <key>' (an HTTP header or gRPC metadata)")
        digest = hash_key(key)
        # Only sha256 digests are ever compared, never the key: the O(1) dict lookup can leak
        # timing about sha256(key) alone, which does not help forge a key (preimage resistance),
        # and the final equality is hmac.compare_digest. A full scan would be O(tenants) per RPC.
        found = by_hash.get(digest)
        stored = digests.get(digest, "")
        if found is None or not hmac.compare_digest(stored.encode(), digest.encode()):
            raise Unauthenticated("unknown API key")
        return found


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key of the one ``authorization: Bearer <key>`` entry; None without one.

    Raises:
        Unauthenticated: more than one ``authorization`` entry. The first Bearer one was taken, so
            which key a call ran on depended on the order a client or a proxy on the way (one that
            adds its own header, or checks the last) wrote them in.
    """
    values = [value for name, value in metadata if name.lower() == "authorization"]
    if len(values) > 1:
        raise Unauthenticated(f"{len(values)} 'authorization' headers (or gRPC metadata entries): send one, "
                              "'authorization: Bearer <key>'")
    value = values[0] if values else ""
    value = value.decode() if isinstance(value, bytes) else value
    if value[: len(_BEARER)].lower() == _BEARER and value[len(_BEARER):].strip():
        return value[len(_BEARER):].strip()
    if value.strip() and value.strip().lower() != _BEARER.strip():  # never echoed: it may be the key itself
        raise Unauthenticated("the 'authorization' header (or gRPC metadata) is not 'Bearer <key>': send the key "
                              "after 'Bearer '")
    return None


def key_id(digest: str) -> str:
    """A key's id in log lines: the first 8 hex digits of its sha256 ``digest`` (the tenants file's
    ``key_sha256``), enough to tell a tenant's keys apart and nothing to guess the key from."""
    return digest[:KEY_ID_HEX]


