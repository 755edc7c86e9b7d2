"""``adapters versions NAME`` and ``adapters rollback NAME --to V``: an adapter's kept versions in a
store folder, listed and rolled back (store/history.py). No model loads: both answer at once."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from dataclasses import asdict

from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.arg_types import integer_arg

DEFAULT_STORE = "./nlora-adapters"  # serve's --adapter-dir default


def _store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="adapter name in the store")
    p.add_argument("--adapter-dir", default=DEFAULT_STORE,
                   help="the adapter store, as serve's --adapter-dir (default: %(default)s)")
    # a server started with a larger --max-adapter-bytes stores larger versions: read with its value
    p.add_argument("--max-adapter-bytes", type=integer_arg(1), default=DEFAULT_MAX_ADAPTER_BYTES, metavar="BYTES",
                   help="largest version read back, its files together, as the server's --max-adapter-bytes "
                        "(give the server's value where it raised it; default: %(default)s)")


def add_history_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``versions`` and ``rollback`` on an ``adapters`` subparsers object."""
    p = subparsers.add_parser(
        "versions", help="list an adapter's versions kept in a store folder (read only, beside a running server)",
        description="List the versions of NAME kept in the adapter store: version, when written (UTC), the "
                    "sha256 over its files, bytes, which one a start serves (current), and whether its files "
                    "still match their SHA256SUMS. The store keeps the --keep-versions N the last "
                    "serve that gave one recorded (1 by default: only the current one); a start without the flag "
                    "keeps the same.")
    _store_argument(p)
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per version")
    p.set_defaults(func=_versions)
    p = subparsers.add_parser(
        "rollback", help="write a kept version of an adapter again as its next version (offline)",
        description="Write version --to of NAME again as its next version in the adapter store (the version "
                    "numbers only grow; the content is the old version's). Offline: refused while a server "
                    "runs on the store (it holds the store's lock), the message giving the live way (adapters "
                    "load --name NAME --version V, a hot swap). The next start serves the new version.")
    _store_argument(p)
    p.add_argument("--to", type=integer_arg(1), required=True, metavar="VERSION",
                   help="the kept version to roll back to (see adapters versions NAME)")
    p.set_defaults(func=_rollback)


def _versions(args: argparse.Namespace) -> int:
    from nlora_serve.adapters.store.history import list_versions
    from nlora_serve.adapters.store.settings import recorded_keep_versions

    found = list_versions(args.adapter_dir, args.name, args.max_adapter_bytes)
    if args.json:
        print(json.dumps([asdict(v) for v in found], indent=2))
        return 0
    print(f"{'VERSION':>7}  {'WRITTEN (UTC)':19}  {'FILES SHA256':16}  {'BYTES':>10}  STATE")
    for v in found:
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created))
        changed = {True: "", None: " (no SHA256SUMS)", False: " (files CHANGED since written)"}[v.intact]
        print(f"{v.version:>7}  {written:19}  {v.files_sha256[:16]}  {v.size:>10}  {v.state}{changed}")
    keep = recorded_keep_versions(Path(args.adapter_dir).expanduser().resolve())
    said = "recorded by the last serve --keep-versions N" if keep else "the default: no start gave --keep-versions"
    print(f"the store keeps each name's newest {keep or 1} version{'s' if (keep or 1) != 1 else ''} ({said})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from nlora_serve.adapters.store.history import rollback

    stored, was_unloaded = rollback(args.adapter_dir, args.name, args.to, args.max_adapter_bytes)
    again = " (it was unloaded: it serves again)" if was_unloaded else ""
    print(f"{args.name}: v{stored.version} written with v{args.to}'s files ({stored.path}); the next start on this "
          f"store serves it{again}")
    return 0
