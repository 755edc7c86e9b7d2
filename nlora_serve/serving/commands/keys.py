"""``nlora-serve keys {new,hash}``: make API keys and the sha256 hashes the tenants file stores.

    nlora-serve keys new                    # prints a fresh key and its hash
    nlora-serve keys new --tenant acme --adapters acme 'acme-*'   # the key and acme's tenants entry
    nlora-serve keys new --tenant big --adapters 'big-*' --weight 2 --max-concurrent-requests 64
    nlora-serve keys new --admin ops        # the key and an admin_keys entry
    echo -n "$KEY" | nlora-serve keys hash

``hash`` reads the key from stdin so it stays out of shell history and process listings.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

from nlora_serve.errors import NloraError
from nlora_serve.serving.auth import Authenticator, hash_key

KEY_BYTES = 32  # 256 random bits: a hashed key is only as safe as it is hard to guess


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``new`` and ``hash`` under ``parser`` (sets ``func`` to :func:`run_keys`)."""
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="{new,hash}")
    for name, summary in (("new", "print a fresh random API key and its sha256 (for the tenants file)"),
                          ("hash", "read a key from stdin and print its sha256 (for the tenants file)")):
        sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
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


def run_keys(args: argparse.Namespace) -> int:
    """Run ``keys new`` / ``keys hash``; returns the exit status (2 on an empty key)."""
    if args.keys_command == "new":
        key = "nls_" + secrets.token_urlsafe(KEY_BYTES)
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
