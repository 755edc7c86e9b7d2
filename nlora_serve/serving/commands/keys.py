"""``nlora-serve keys {new,hash}``: make API keys and the sha256 hashes the tenants file stores.

    nlora-serve keys new                    # prints a fresh key and its hash
    echo -n "$KEY" | nlora-serve keys hash

``hash`` reads the key from stdin so it stays out of shell history and process listings.
"""

from __future__ import annotations

import argparse
import secrets
import sys

from nlora_serve.serving.auth import hash_key

KEY_BYTES = 32  # 256 random bits: a hashed key is only as safe as it is hard to guess


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``new`` and ``hash`` under ``parser`` (sets ``func`` to :func:`run_keys`)."""
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="{new,hash}")
    for name, summary in (("new", "print a fresh random API key and its sha256 (for the tenants file)"),
                          ("hash", "read a key from stdin and print its sha256 (for the tenants file)")):
        sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
    parser.set_defaults(func=run_keys)


def run_keys(args: argparse.Namespace) -> int:
    """Run ``keys new`` / ``keys hash``; returns the exit status (2 on an empty key)."""
    if args.keys_command == "new":
        key = "nls_" + secrets.token_urlsafe(KEY_BYTES)
        print(f"key:        {key}")
        print(f"key_sha256: {hash_key(key)}")
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
