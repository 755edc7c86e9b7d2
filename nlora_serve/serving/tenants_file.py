"""The tenants file: who holds which key, and what each may use (DESIGN §6).

It is JSON, or TOML when its name ends in ``.toml``, and stores only sha256 hashes of keys::

    {"admin_keys": [{"name": "ops", "key_sha256": "<64 hex>"}],
     "tenants": [{"name": "acme", "key_sha256": "<64 hex>",
                  "adapters": ["acme", "acme-*"], "base_model": false}]}

``adapters`` holds adapter names or shell-style patterns (``fnmatch``, case-sensitive);
``base_model`` (default false) lets the tenant generate without an adapter. Optional, per tenant:
``weight`` (default 1, from 0.001 to 1000; its share of the server under ``--scheduling-policy fair``,
relative to the other tenants') and ``max_concurrent_requests`` (default none: its requests running or
waiting at most). :func:`read` checks a file and gives each key's :class:`~nlora_serve.serving.auth.Principal`;
``serving/auth.py`` authenticates calls against them.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from nlora_serve.cli import console_command
from nlora_serve.engine.config import TENANT_WEIGHT_RULE, is_tenant_weight
from nlora_serve.errors import shown
from nlora_serve.serving.auth import AuthError, Principal, key_id

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-fA-F]*")


def _hash_how() -> str:
    return f'echo -n "$KEY" | {console_command()} keys hash'


def read(path: str | Path) -> dict[str, Principal]:
    """Read a tenants file: sha256 digest of each key -> its principal (``key_id`` set), in the
    file's order (admin_keys, then tenants).

    Raises:
        AuthError: unreadable file, ``tenants`` or ``admin_keys`` not a list, a plaintext ``key`` field, a bad hash, a duplicate hash, a
            field it does not know (a typo such as ``admins`` or ``base_modle`` would otherwise
            leave the server without an admin or a tenant without its grant, silently), a name
            that is not a non-empty string, or that two entries with different grants or settings
            share (the name is the tenant's identity: its prefix-cache group, queue quota, fair
            share and request-id namespace; several keys of one tenant must say the same), a
            ``base_model`` that is not true or false, a name with a character that is not printable
            or a '/', over 256 characters, or starting with ``nls_`` or holding a key as a key does
            (see :func:`_name`), an adapter pattern that holds a key (:func:`key_shaped`; ``keys
            list`` prints the patterns), a file that holds no key at all (every request refused),
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
    return parse(doc, path)


def parse(doc: object, path: str | Path) -> dict[str, Principal]:
    """A tenants file's parsed contents, checked as :func:`read` checks them (``path`` names
    the source in messages; ``keys new --tenant`` checks the entry it prints here).

    Raises:
        AuthError: as :func:`read`.
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
        pasted = next((j for j, pattern in enumerate(adapters) if key_shaped(pattern)), None)
        if pasted is not None:  # `keys list` prints the patterns; /v1/models names what a key may use
            raise AuthError(f"{where}.adapters[{pasted}] has the shape of an API key ({KEY_PREFIX!r} and "
                            f"{KEY_CHARS} characters, as `keys new` makes them; not shown): is a key pasted "
                            "there? An adapter pattern is printed by `keys list`; store the key's sha256 in "
                            "key_sha256 instead")
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
    return by_hash


def _read_regular(path: Path) -> str:
    """The text of ``path``, a regular file (a link to one is followed) of at most
    :data:`MAX_FILE_BYTES`, as UTF-8. SIGHUP reads the file on the reload thread (tenants_reload.py;
    it read it on the event loop before): a FIFO put in its place blocked the open until a writer came
    (every stream and request of every tenant froze, SIGTERM included; on the thread, every later
    reload), and a link to a device such as /dev/zero read without end; both are opened without
    blocking and refused before any read. A huge regular file (a sparse ``truncate -s 20G``, a log
    written to the wrong path) was read whole into memory, twice (bytes, then text): a SIGHUP could
    take the serving process to the OOM killer; it is refused by its size before any read, and one
    whose size the kernel does not say (procfs) after :data:`MAX_FILE_BYTES` + 1 bytes.

    Raises:
        OSError: unreadable, not a regular file (the message names what it is), or over
            :data:`MAX_FILE_BYTES`.
        ValueError: not UTF-8.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb", closefd=True) as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            mode = info.st_mode
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
            raise OSError(f"not a regular file: {kind}")
        data = b"" if info.st_size > MAX_FILE_BYTES else file.read(MAX_FILE_BYTES + 1)
        if info.st_size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
            size = f"{info.st_size:,} bytes" if info.st_size > MAX_FILE_BYTES else "more bytes"
            raise OSError(f"{size}: a tenants file holds at most {MAX_FILE_BYTES:,} bytes "
                          f"({MAX_FILE_BYTES // 2**20} MiB, some 450,000 tenants); is it the right file?")
        return data.decode("utf-8")


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
            entry = "" if name is None else f" (in the entry named {_quoted(name)})"
            raise _DuplicateField(f"field {_quoted(field)} is given twice in one object{entry}; JSON would keep the "
                                  "last silently: write it once")
        doc[field] = value
    return doc


def _toml(text: str, path: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        raise AuthError(f"tenants file {path}: TOML needs Python 3.11+; use JSON") from None
    return tomllib.loads(text)


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
# a tenants file's size at most: 10,000 tenants are 1.4 MB; bounds what a reload may read into memory
MAX_FILE_BYTES = 64 * 2**20
KEY_PREFIX = "nls_"  # what `keys new` starts a key with: never echoed, never a name
KEY_BYTES = 32  # `keys new`'s random bytes: 256 bits, a hashed key is only as safe as it is hard to guess
KEY_CHARS = -(-KEY_BYTES * 4 // 3)  # after the prefix: secrets.token_urlsafe's unpadded base64, 43
# exactly KEY_CHARS after the prefix: a longer run of those characters is no key (an adapter name
# such as nls_customer-support-summarizer-2026-12-07-v3-ft, up to 128 characters, was refused as one)
_KEY_SHAPE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{%d}(?![A-Za-z0-9_-])" % KEY_CHARS)


def key_shaped(text: str) -> bool:
    """Whether ``text`` holds a run shaped as a key ``keys new`` makes (:data:`KEY_PREFIX`, then
    exactly :data:`KEY_CHARS` URL-safe base64 characters, none after them): a key pasted where a
    name or pattern goes. A name starting ``nls_`` can be an adapter's (``nls_summary``, or a long
    one); one holding exactly 43 random characters after it is, in practice, never an adapter's."""
    return _KEY_SHAPE.search(text) is not None
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
    to the log on a reload: a value of megabytes was a line of megabytes); a string that starts as an
    API key does is not shown (:func:`_quoted`), nor a list or object that holds one (its ``repr``
    quoted the key whole)."""
    if isinstance(value, str):
        return _quoted(value)
    text = repr(value)
    if KEY_PREFIX in text:
        return f"a {type(value).__name__} holding a string with {KEY_PREFIX!r} (not shown: an API key?)"
    return shown(text)


def _quoted(text: str) -> str:
    """``text`` quoted for a refusal (``repr``, at most :func:`shown`'s length), except a string that
    starts with :data:`KEY_PREFIX` or holds a key (:func:`key_shaped`): a key pasted into the wrong field (a name, a weight, a field's
    name) was echoed whole into the refusal, which SIGHUP's reload writes to the server's log."""
    if text.startswith(KEY_PREFIX) or key_shaped(text):
        return f"a string with {KEY_PREFIX!r} ({len(text)} characters, not shown: an API key?)"
    return repr(shown(text))


def _known_fields(obj: dict, known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise AuthError(f"{where}: unknown field(s) {', '.join(_quoted(f) for f in unknown[:5])}{more}; "
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
    if name.startswith(KEY_PREFIX) or key_shaped(name):  # a key pasted there: in every log line and /metrics
        raise AuthError(f"{where}.name is {_quoted(name)}: a name must not start with {KEY_PREFIX!r} nor hold a "
                        "key, as the API keys `keys new` makes do; is a key pasted there? (the name is written into log lines and "
                        "metrics labels; /metrics takes no key)")
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
