"""Multi-tenant API keys: who is calling, and may they use this adapter (DESIGN §6).

The tenants file (JSON, or TOML when it ends in ``.toml``) stores only sha256 hashes of keys::

    {"admin_keys": [{"name": "ops", "key_sha256": "<64 hex>"}],
     "tenants": [{"name": "acme", "key_sha256": "<64 hex>",
                  "adapters": ["acme", "acme-*"], "base_model": false}]}

``adapters`` holds adapter names or shell-style patterns (``fnmatch``, case-sensitive);
``base_model`` (default false) lets the tenant generate without an adapter. Optional, per tenant:
``weight`` (default 1, from 0.001 to 1000; its share of the server under ``--scheduling-policy fair``,
relative to the other tenants') and ``max_concurrent_requests`` (default none: its requests running or waiting at
most, beyond that refused as the full queue is). Admin keys may call
every RPC and use every adapter. Keys travel as ``authorization: Bearer <key>`` metadata; make
them random (``python -m nlora_serve.serving.commands.keys new``), since a hash only protects a key
that cannot be guessed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field as dataclass_field, replace
from pathlib import Path

from nlora_serve.cli import console_command
from nlora_serve.engine.config import TENANT_WEIGHT_RULE, is_tenant_weight
from nlora_serve.errors import NloraError, shown

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-fA-F]*")
_BEARER = "bearer "
KEY_ID_HEX = 8  # hex digits of a key's sha256 that name it in log lines (key_id)


def _hash_how() -> str:
    return f'echo -n "$KEY" | {console_command()} keys hash'


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
        """Read a tenants file.

        Raises:
            AuthError: unreadable file, ``tenants`` or ``admin_keys`` not a list, a plaintext ``key`` field, a bad hash, a duplicate hash, a
                field it does not know (a typo such as ``admins`` or ``base_modle`` would otherwise
                leave the server without an admin or a tenant without its grant, silently), a name
                that is not a non-empty string, or that two entries with different grants or settings
                share (the name is the tenant's identity: its prefix-cache group, queue quota, fair
                share and request-id namespace; several keys of one tenant must say the same), a
                ``base_model`` that is not true or false, a name with a character that is not printable
                or a '/', or over 256 characters (see :func:`_name`), a file that holds no key at all (every request refused),
                a field written twice in one object (JSON keeps the last silently: a second ``tenants``
                list dropped the first's tenants, a second ``key_sha256`` or ``adapters`` in an entry
                replaced its key or grants; TOML's parser refuses these itself).
        """
        path = Path(path)
        try:
            text = _read_regular(path)
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8
            raise AuthError(f"tenants file {path}: cannot read it ({exc})") from None
        toml = path.suffix == ".toml"
        try:  # a newcomer's find: "cannot read it (Expecting value: ...)" read as a permission problem
            doc = _toml(text, path) if toml else json.loads(text, object_pairs_hook=_no_duplicate_fields)
        except _DuplicateField as exc:  # a ValueError too: named before the parser's other refusals
            raise AuthError(f"tenants file {path}: {exc}") from None
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser
            raise AuthError(f"tenants file {path}: cannot read it as {'TOML' if toml else 'JSON'} ({exc})") from None
        return cls.from_document(doc, path)

    @classmethod
    def from_document(cls, doc: object, path: str | Path) -> Authenticator:
        """A tenants file's parsed contents, checked as :meth:`from_file` checks them (``path`` names
        the source in messages; ``keys new --tenant`` checks the entry it prints here).

        Raises:
            AuthError: as :meth:`from_file`.
        """
        if not isinstance(doc, dict):
            raise AuthError(f"tenants file {path}: expected an object with 'tenants' and 'admin_keys'")
        _known_fields(doc, _FILE_FIELDS, f"tenants file {path}")
        for section in _FILE_FIELDS:  # else enumerate() crashed on null or a number, and took a string's letters
            if not isinstance(doc.get(section, []), list):
                raise AuthError(f"tenants file {path}: {section} must be a list of entries ({{...}}, ...); got "
                                f"{type(doc[section]).__name__}")
        by_hash: dict[str, Principal] = {}
        for i, entry in enumerate(doc.get("admin_keys", [])):
            where = f"{path}: admin_keys[{i}]"
            digest = _entry_hash(entry, where)
            _known_fields(entry, _ADMIN_FIELDS, where)
            _add(by_hash, digest, Principal(_name(entry, f"admin-{i}", where), is_admin=True), where)
        for i, entry in enumerate(doc.get("tenants", [])):
            where = f"{path}: tenants[{i}]"
            digest = _entry_hash(entry, where)
            _known_fields(entry, _TENANT_FIELDS, where)
            adapters = entry.get("adapters", [])
            if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
                raise AuthError(f"{where}.adapters must be a list of adapter names or patterns")
            base_model = entry.get("base_model", False)
            if not isinstance(base_model, bool):  # bool("false") would grant the base model
                raise AuthError(f"{where}.base_model must be true or false; got {_got(base_model)}")
            _add(by_hash, digest, Principal(_name(entry, f"tenant-{i}", where), False, tuple(adapters),
                                            base_model, *_quota(entry, where)), where)
        _one_identity_per_name(by_hash.values(), path)
        if not by_hash:  # it parsed, but every request would be refused (401) until the file changes
            raise AuthError(f"tenants file {path}: holds no key (no entry in 'tenants' or 'admin_keys'), so every "
                            f"request would be refused; add one ({console_command()} keys new --tenant NAME "
                            "--adapters PATTERN, or --admin NAME), or start without --tenants-file for a "
                            "loopback-only server without auth")
        return cls(by_hash)

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


def _read_regular(path: Path) -> str:
    """The text of ``path``, a regular file (a link to one is followed). SIGHUP reads the file on
    the reload thread (tenants_reload.py; it read it on the event loop before): a FIFO put in its
    place blocked the open until a writer came (every stream and request of every tenant froze,
    SIGTERM included; on the thread, every later reload), and a link to a device such as /dev/zero read
    without end; both are opened without blocking and refused before any read.

    Raises:
        OSError: unreadable, or not a regular file (the message names what it is).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, closefd=True) as file:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
            raise OSError(f"not a regular file: {kind}")
        return file.read()


class _DuplicateField(ValueError):
    """A JSON object that names one field twice."""


def _no_duplicate_fields(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads``' object_pairs_hook: the object, refusing a field given twice (the field's name
    is shown, never its values: a second ``key_sha256`` may be a pasted key).

    Raises:
        _DuplicateField: naming the field and, where the object has one, its entry's ``name``.
    """
    doc: dict = {}
    for field, value in pairs:
        if field in doc:
            name = next((v for k, v in pairs if k == "name" and isinstance(v, str)), None)
            entry = "" if name is None else f" (in the entry named {shown(name)!r})"
            raise _DuplicateField(f"field {shown(field)!r} is given twice in one object{entry}; JSON would keep the "
                                  "last silently: write it once")
        doc[field] = value
    return doc


def _toml(text: str, path: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        raise AuthError(f"tenants file {path}: TOML needs Python 3.11+; use JSON") from None
    return tomllib.loads(text)


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


def _entry_hash(entry: object, where: str) -> str:
    if not isinstance(entry, dict):
        raise AuthError(f"{where}: expected an object")
    if "key" in entry or "api_key" in entry:
        raise AuthError(f"{where}: holds a plaintext key; store only 'key_sha256' ({_hash_how()})")
    if "key_sha256" not in entry:
        raise AuthError(f"{where}: key_sha256 is missing; store the sha256 of the key ({_hash_how()})")
    digest = entry["key_sha256"]
    # never echoed: a wrong value here is most often the key itself, pasted in place of its hash
    if not isinstance(digest, str):
        raise AuthError(f"{where}.key_sha256 must be a string of 64 hex characters (sha256 of the key); "
                        f"got a {type(digest).__name__}")
    if _HEX64.fullmatch(digest.lower()) is None:
        raise AuthError(f"{where}.key_sha256 must be 64 hex characters (sha256 of the key); got {len(digest)} "
                        f"characters{'' if _HEX.fullmatch(digest) else ', not all hex'} (not shown: if it is the "
                        f"plaintext key, store its sha256 instead: {_hash_how()})")
    return digest.lower()


MAX_NAME_CHARS = 256  # a tenant's or admin's name (an adapter's: 128)
_FILE_FIELDS = ("tenants", "admin_keys")
_ADMIN_FIELDS = ("name", "key_sha256")
_TENANT_FIELDS = ("name", "key_sha256", "adapters", "base_model", "weight", "max_concurrent_requests")


def _quota(entry: dict, where: str) -> tuple[float, int | None]:
    """(weight, max_concurrent_requests) of a tenant entry."""
    weight = entry.get("weight", 1.0)
    if not is_tenant_weight(weight):
        raise AuthError(f"{where}.weight must be {TENANT_WEIGHT_RULE}; got {_got(weight)}")
    limit = entry.get("max_concurrent_requests")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise AuthError(f"{where}.max_concurrent_requests must be a positive integer; got {_got(limit)}")
    return float(weight), limit


def _got(value: object) -> str:
    """``value`` as a refusal quotes it: its ``repr``, at most :func:`shown`'s length (the message goes
    to the log on a reload: a value of megabytes was a line of megabytes)."""
    return shown(repr(value))


def _known_fields(obj: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise AuthError(f"{where}: unknown field(s) {', '.join(repr(shown(f)) for f in unknown[:5])}{more}; "
                        f"expected only {', '.join(map(repr, known))}")


def _name(entry: dict, default: str, where: str) -> str:
    """An entry's name: it is written into log lines and metrics labels and prefixes the tenant's
    request ids in the engine (``name/id``), so a control character (a newline, an ANSI escape: a
    forged log line) or any other character ``str.isprintable`` refuses (format characters such as a
    bidi override, separators other than the space), and '/' (tenant "a/b" with id "c" would be
    tenant "a" with id "b/c"), are refused, and so is one over :data:`MAX_NAME_CHARS` characters."""
    name = entry.get("name", default)
    if not isinstance(name, str) or not name:
        raise AuthError(f"{where}.name must be a non-empty string; got {_got(name)}")
    if len(name) > MAX_NAME_CHARS:  # it is in every log line and metrics label of the tenant's requests
        raise AuthError(f"{where}.name {shown(name)!r} is {len(name)} characters; at most {MAX_NAME_CHARS}")
    bad = next((i for i, c in enumerate(name) if c == "/" or not c.isprintable()), None)
    if bad is not None:  # repr() escapes what isprintable() refuses: the message is safe to log
        raise AuthError(f"{where}.name {shown(name)!r} has U+{ord(name[bad]):04X} at character {bad + 1}; a name "
                        "must be printable characters other than '/' (no control, format or line-separator "
                        "character: names are written into log lines and metrics labels, and prefix the "
                        "tenant's request ids)")
    return name


def _add(by_hash: dict[str, Principal], digest: str, principal: Principal, where: str) -> None:
    if digest in by_hash:
        raise AuthError(f"{where}.key_sha256 {digest[:12]}... is given to both {by_hash[digest].name!r} "
                        f"and {principal.name!r}")
    by_hash[digest] = replace(principal, key_id=key_id(digest))


def key_id(digest: str) -> str:
    """A key's id in log lines: the first 8 hex digits of its sha256 ``digest`` (the tenants file's
    ``key_sha256``), enough to tell a tenant's keys apart and nothing to guess the key from."""
    return digest[:KEY_ID_HEX]


def _one_identity_per_name(principals: Iterable[Principal], path: Path) -> None:
    """Keys under one name are one tenant (prefix-cache group, quota, fair share): several keys of
    it (a rotation) must say the same, else two customers would silently become one."""
    by_name: dict[str, Principal] = {}
    for principal in principals:
        first = by_name.setdefault(principal.name, principal)
        if first != principal:
            raise AuthError(f"tenants file {path}: name {principal.name!r} is given to two entries with different "
                            "grants or settings; the name is the tenant's identity (prefix-cache group, quota, "
                            "fair share): give each tenant its own name, or the same settings to every key of it")
