"""``nlora-serve keys {new,hash,list}``: make API keys and the sha256 hashes the tenants file stores;
list what a tenants file grants.

    nlora-serve keys new                    # prints a fresh key and its hash
    nlora-serve keys new --tenant acme --adapters acme 'acme-*'   # the key and acme's tenants entry
    nlora-serve keys new --tenant big --adapters 'big-*' --weight 2 --max-concurrent-requests 64
    nlora-serve keys new --admin ops        # the key and an admin_keys entry
    echo -n "$KEY" | nlora-serve keys hash
    nlora-serve keys list --tenants-file tenants.json [--json]   # each key's id, tenant, grants, quota

``hash`` reads the key from stdin so it stays out of shell history and process listings. ``list``
reads the file with the server's own parser (the same refusals, exit 2) and prints each key's id (the
first 8 hex digits of its sha256, as the server's log lines name it), never a key nor its hash.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

from nlora_serve.errors import NloraError
from nlora_serve.serving.auth import Authenticator, Principal, hash_key
from nlora_serve.serving.tenants_file import KEY_BYTES, KEY_PREFIX


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``new``, ``hash`` and ``list`` under ``parser`` (sets ``func`` to :func:`run_keys`)."""
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="{new,hash,list}")
    for name, summary in (("new", "print a fresh random API key and its sha256 (for the tenants file)"),
                          ("hash", "read a key from stdin and print its sha256 (for the tenants file)"),
                          ("list", "list a tenants file's keys: key id, tenant, grants, weight and quota")):
        sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
    listing = sub.choices["list"]
    listing.epilog = ("The file is read as `serve --tenants-file` reads it (a file the server refuses is refused "
                      "here with the same message, exit 2). A key is named by its id, the first 8 hex digits of its "
                      "sha256 (the key= of the server's log lines); neither the key nor its hash is printed.")
    listing.add_argument("--tenants-file", required=True, metavar="FILE",
                         help="the tenants file (JSON, or TOML when it ends in .toml) to list")
    listing.add_argument("--json", action="store_true",
                         help="print a JSON list, one object per key, instead of a table")
    new = sub.choices["new"]
    new.epilog = ("With --tenant or --admin, the second line is the key's entry for the tenants file, as JSON: "
                  "paste it into its \"tenants\" (or \"admin_keys\") list. The key is printed only here.")
    who = new.add_mutually_exclusive_group()
    who.add_argument("--tenant", metavar="NAME", help="print a \"tenants\" entry for tenant NAME instead of the hash")
    who.add_argument("--admin", metavar="NAME", help="print an \"admin_keys\" entry for NAME instead of the hash")
    new.add_argument("--adapters", nargs="+", default=[], metavar="PATTERN",
                     help="with --tenant: the adapter names or shell-style patterns it may use, e.g. acme 'acme-*'")
    new.add_argument("--base-model", action="store_true", help="with --tenant: it may also use the base model")
    new.add_argument("--weight", type=float, metavar="W",
                     help="with --tenant: its share of the server under --scheduling-policy fair, relative to the "
                          "other tenants', from 0.001 to 1000 (default 1)")
    new.add_argument("--max-concurrent-requests", type=int, metavar="N",
                     help="with --tenant: its requests running or waiting at most (default: no quota)")
    parser.set_defaults(func=run_keys)


def tenants_entry(args: argparse.Namespace, key: str) -> tuple[str, dict] | None:
    """(section, entry) of the tenants file for ``key`` as ``keys new``'s flags ask, None without
    --tenant / --admin; checked by the tenants file's own loader, so that the entry printed loads.

    Raises:
        NloraError: --adapters / --base-model / --weight / --max-concurrent-requests without
            --tenant, a tenant granted nothing, or an entry the loader refuses (its message: a
            weight that is not a number from 0.001 to 1000, a quota that is not a positive integer).
    """
    quota = {"weight": args.weight, "max_concurrent_requests": args.max_concurrent_requests}
    quota = {field: value for field, value in quota.items() if value is not None}
    if args.tenant is None and (args.adapters or args.base_model or quota):
        raise NloraError("--adapters, --base-model, --weight and --max-concurrent-requests describe a tenant: "
                         "give --tenant NAME too")
    if args.admin is not None:
        section, entry = "admin_keys", {"name": args.admin, "key_sha256": hash_key(key)}
    elif args.tenant is not None:
        if not args.adapters and not args.base_model:
            raise NloraError(f"--tenant {args.tenant} would be granted nothing: give --adapters PATTERN... "
                             "and/or --base-model")
        section, entry = "tenants", {"name": args.tenant, "key_sha256": hash_key(key),
                                     "adapters": args.adapters, "base_model": args.base_model, **quota}
    else:
        return None
    Authenticator.from_document({section: [entry]}, "keys new")  # AuthError (an NloraError) names the field
    return section, entry


def key_row(principal: Principal) -> dict:
    """One key of a tenants file as ``keys list --json`` prints it: ``key_id`` (8 hex digits),
    ``name``, ``role`` ("admin" or "tenant"), ``adapters`` (names or fnmatch patterns; an admin's
    ``["*"]``: every one), ``base_model`` (bool), ``weight`` (fair share, float) and
    ``max_concurrent_requests`` (int, or None: no quota)."""
    admin = principal.is_admin
    return {"key_id": principal.key_id, "name": principal.name, "role": "admin" if admin else "tenant",
            "adapters": ["*"] if admin else list(principal.adapters), "base_model": admin or principal.base_model,
            "weight": principal.weight, "max_concurrent_requests": principal.max_concurrent_requests}


def list_keys(path: str, as_json: bool) -> str:
    """The text ``keys list`` prints for the tenants file at ``path``: a table (a header line, then
    one line per key, in the file's order) or, with ``as_json``, a JSON list of :func:`key_row`.

    Raises:
        AuthError: the file is refused, as ``serve --tenants-file`` refuses it (the same message).
    """
    rows = [key_row(p) for p in Authenticator.from_file(path).principals()]
    if as_json:
        return json.dumps(rows, indent=2)
    table = [("KEY_ID", "NAME", "ROLE", "ADAPTERS", "BASE_MODEL", "WEIGHT", "MAX_CONCURRENT")]
    table += [(r["key_id"], r["name"], r["role"], _cell(",".join(r["adapters"])) or "-",
               "yes" if r["base_model"] else "no", f"{r['weight']:g}",
               "-" if r["max_concurrent_requests"] is None else str(r["max_concurrent_requests"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def _cell(text: str) -> str:
    """``text`` with what ``str.isprintable`` refuses escaped: a pattern in the file may hold a control
    character (names are checked by the parser; patterns are not), which must not reach a terminal raw."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def run_keys(args: argparse.Namespace) -> int:
    """Run ``keys new`` / ``keys hash`` / ``keys list``; returns the exit status (2 on an empty key;
    a refused tenants file raises AuthError, which the CLI prints and exits 2 on)."""
    if args.keys_command == "list":
        print(list_keys(args.tenants_file, args.json))
        return 0
    if args.keys_command == "new":
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
        made = tenants_entry(args, key)
        print(f"key:        {key}")
        if made is None:
            print(f"key_sha256: {hash_key(key)}")
        else:
            print(json.dumps(made[1]))
            print(f"paste the second line into the tenants file's \"{made[0]}\" list (the key is shown only here)",
                  file=sys.stderr)
        return 0
    key = sys.stdin.read().strip()
    if not key:
        print("error: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nlora-serve keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_keys_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
