"""``nlora-serve client ...``: talk to a running server (generate, info, list, upload, swap, unload, load).

    nlora-serve client generate --server 127.0.0.1:50051 --adapter tenant-000 --message "Hi"
    nlora-serve client upload --server HOST:PORT --api-key $ADMIN_KEY --name acme ./acme-adapter
    nlora-serve client swap --server HOST:PORT --name acme ./new_n.safetensors --if-version 3

The key defaults to $NLORA_API_KEY. Results print as one JSON object (generate streams text). Errors
print one ``error:`` line and exit 2: the server's status code and message, or what is wrong with a
local file or flag (checked before any call).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from nlora_serve.arg_types import integer_arg, number_arg, unsigned_arg
from nlora_serve.client.messages import check_api_key
from nlora_serve.client.sync import NloraClient
from nlora_serve.client.types import (AdapterInfo, InvalidInput, NloraClientError, NotFound, Unauthenticated,
                                      Unavailable)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the client subcommands under ``parser``; each sets ``client_func`` (run by :func:`run_client`)."""
    _add_connection_flags(parser, with_defaults=True)
    sub = parser.add_subparsers(dest="client_command", required=True)
    gen = _command(sub, "generate", "stream a completion to stdout")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="raw text prompt (no chat template)")
    source.add_argument("--message", help="one user message, wrapped in the model's chat template")
    gen.add_argument("--adapter", default=None, help="adapter name (default: the base model)")
    gen.add_argument("--add-special-tokens", action=argparse.BooleanOptionalAction, default=True,
                     help="--prompt takes the tokenizer's special tokens, e.g. a BOS (vLLM's add_special_tokens; "
                          "default: on)")
    gen.add_argument("--max-tokens", type=unsigned_arg(32), default=0,
                     help="new tokens at most (default: 0, the rest of the context, at most the server's "
                          "--max-tokens)")
    gen.add_argument("--temperature", type=number_arg(0.0), default=0.0, help="0 = greedy (default)")
    gen.add_argument("--seed", type=unsigned_arg(64), default=None, help="seed for reproducible sampling (>= 0)")
    gen.set_defaults(client_func=_generate)
    _command(sub, "info", "model, dtype and limits of the server").set_defaults(client_func=_info)
    _add_adapter_commands(sub)
    for command in sub.choices.values():
        _add_connection_flags(command, with_defaults=False)


def add_server_adapter_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """``nlora-serve adapters {list,upload,swap,unload,load} --server HOST:PORT``: the same calls
    as ``client list`` etc., under the adapters group as DESIGN §6 spells them."""
    for command in _add_adapter_commands(subparsers):
        _add_connection_flags(command, with_defaults=True)
        command.set_defaults(func=run_client)


def _command(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` opens with the one-line summary the command listing shows."""
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")


def _add_adapter_commands(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """list / upload / swap / unload / load parsers, each with its ``client_func``."""
    listing = _command(sub, "list", "adapters this key may use (on a server)")
    listing.add_argument("--json", action="store_true",
                         help="print every field as JSON (content hash, target modules, tied, bytes, active requests) "
                              "instead of a table")
    listing.set_defaults(client_func=_list)
    up = _command(sub, "upload", "upload an adapter directory to a server (admin); a name it serves "
                                "already gets it as its next version")
    up.add_argument("--name", required=True, help="adapter name on the server")
    up.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    up.set_defaults(client_func=_upload)
    swap = _command(sub, "swap", "hot-swap a tied tenant's N on a server from a safetensors file (admin)")
    swap.add_argument("--name", required=True, help="adapter name on the server")
    swap.add_argument("n_file", help="safetensors file of lora_N keys only (a compact tied adapter's "
                                     "adapter_model.safetensors is one)")
    swap.add_argument("--if-version", type=unsigned_arg(64), default=None,
                      help="swap only if this is the current version")
    swap.set_defaults(client_func=_swap)
    unload = _command(sub, "unload", "stop serving an adapter on a server (admin)")
    unload.add_argument("--name", required=True, help="adapter name on the server")
    unload.add_argument("--force", action="store_true", help="abort its in-flight requests")
    unload.set_defaults(client_func=_unload)
    load = _command(sub, "load", "serve again an adapter that is in the server's store, as its next "
                                "version (admin)")
    load.add_argument("--name", required=True, help="adapter name on the server")
    # versions start at 1 (as rollback's --to); 0, the proto's unset value, would be a plain load
    load.add_argument("--version", type=integer_arg(1, (1 << 64) - 1), default=0, metavar="V",
                      help="roll back: serve version V kept in the server's store (serve --keep-versions; "
                           "`adapters versions NAME` lists them) as the name's next version, a hot swap as an "
                           "upload's (default: the newest stored version of a name not served)")
    load.set_defaults(client_func=_load)
    return [listing, up, swap, unload, load]


DEFAULT_SERVER = "127.0.0.1:50051"  # serve's default --port on loopback
SERVER_ENV = "NLORA_SERVER"  # set once where the server runs on other ports, instead of --server on every command


def default_server() -> str:
    """``--server``'s default: ``$NLORA_SERVER`` when set and not empty, else :data:`DEFAULT_SERVER`."""
    return os.environ.get(SERVER_ENV) or DEFAULT_SERVER


def server_address(text: str) -> str:
    """argparse type of ``--server``: a gRPC target, refused where it reads as an HTTP URL or a bare
    port (h130: ``--server http://127.0.0.1:50051`` got gRPC's "errors resolving ...: Misformatted
    domain name"); gRPC's own target forms (``dns:///HOST:PORT``, ``unix:PATH``) pass."""
    if text.lower().startswith(("http://", "https://")):
        address = text.split("://", 1)[1].split("/", 1)[0]
        raise argparse.ArgumentTypeError(f"HOST:PORT of the gRPC port, not a URL (as also ${SERVER_ENV}): "
                                         f"{address}; got {text}")
    if text.isdigit():
        raise argparse.ArgumentTypeError(f"HOST:PORT, not a port alone (as also ${SERVER_ENV}): 127.0.0.1:{text}; "
                                         f"got {text}")
    return text


def _add_connection_flags(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """--server, --api-key, --timeout, accepted before and after the subcommand (``client --server X
    generate`` and ``client generate --server X``); only the ``client`` level sets the defaults,
    so a subcommand never overwrites a value given before it."""
    def default(value):
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument("--server", type=server_address, default=default(default_server()),
                        help=f"HOST:PORT of the server's gRPC port (default: ${SERVER_ENV}, else {DEFAULT_SERVER})")
    # argparse runs ``type`` on a string default too, so a bad $NLORA_API_KEY is refused the same way
    parser.add_argument("--api-key", type=_api_key, default=default(os.environ.get("NLORA_API_KEY")),
                        help="API key sent as 'authorization: Bearer' (default: $NLORA_API_KEY)")
    parser.add_argument("--timeout", type=_seconds, default=default(None),
                        help="deadline of each call in seconds, > 0 (default: none)")


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (gRPC takes any float: a negative deadline,
    nan and inf fail every call as DEADLINE_EXCEEDED, which reads like a slow server)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0; got {text}")
    return value


def _api_key(text: str) -> str:
    """argparse type: a key gRPC metadata can carry (see :func:`~nlora_serve.client.messages.check_api_key`)."""
    try:
        return check_api_key(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_client(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; returns the exit status (2 when the server or the client refused it)."""
    try:
        with NloraClient(args.server, api_key=args.api_key, timeout=args.timeout) as client:
            return args.client_func(client, args)
    except NloraClientError as exc:
        print(f"error: {exc}{_hint(exc, args)}", file=sys.stderr)
        return 2


def _hint(exc: NloraClientError, args: argparse.Namespace) -> str:
    """What to do, for the failures whose status message does not say it in the CLI's terms: no
    connection (gRPC's "failed to connect", also its words for an HTTP server on that port), no key
    sent and an unknown adapter name (HTTP's 404 names GET /v1/models; gRPC's said nothing); "" for the
    others."""
    if isinstance(exc, Unavailable) and "failed to connect" in str(exc):
        return (f"; is an nlora-serve server running on {args.server}? --server (or ${SERVER_ENV}) takes its gRPC "
                "port (serve --port, 50051 by default), not its --http-port")
    if isinstance(exc, Unauthenticated) and not args.api_key:  # none, or "" (an unset $NLORA_API_KEY pasted)
        return "; this server wants a key: --api-key KEY or $NLORA_API_KEY"
    if isinstance(exc, NotFound) and str(exc).endswith("is not registered"):  # a typo'd --adapter / --name
        return "; `nlora-serve client list` names the adapters this key may use"
    return ""


def _generate(client: NloraClient, args: argparse.Namespace) -> int:
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        sampling["seed"] = args.seed
    # the flag is sent for text only (off: the server's default is on); a chat never takes it
    source = {"prompt": args.prompt, "add_special_tokens": None if args.add_special_tokens else False} \
        if args.prompt is not None else {"messages": [{"role": "user", "content": args.message}]}
    last = None
    for last in client.generate(**source, adapter=args.adapter, **sampling):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if last is not None and last.usage is not None:
        ref = f"{last.adapter} v{last.adapter_version}" if last.adapter else "base model"
        print(f"[{ref}; {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} tokens, "
              f"TTFT {last.usage.time_to_first_token_s * 1e3:.0f} ms, {last.usage.duration_s:.2f} s, "
              f"finish {last.finish_reason}]", file=sys.stderr)
    return 0


def _print(obj: dict) -> None:
    """Every command's result: one JSON object, indented, newline-terminated."""
    print(json.dumps(obj, indent=2))


def _info_dict(info) -> dict:
    return {f: getattr(info, f) for f in info.__slots__}


def _list(client: NloraClient, args: argparse.Namespace) -> int:
    adapters, base_allowed = client.list_adapters()
    if args.json:
        _print({"base_model_allowed": base_allowed, "adapters": [_info_dict(a) for a in adapters]})
    else:
        print(adapter_table(adapters, base_allowed))
    return 0


def adapter_table(adapters: list[AdapterInfo], base_allowed: bool) -> str:
    """``client list``'s table: one line per adapter (name, version, flavour, rank, the bytes the
    server holds for it, "no" while not resident, and its running requests), then whether the key
    may use the base model; ``--json`` prints every field (h130: ~18 JSON lines an adapter)."""
    rows = [("NAME", "VERSION", "FLAVOUR", "RANK", "RESIDENT", "ACTIVE")]
    rows += [(a.name, str(a.version), a.flavour, str(a.rank), _size(a.resident_bytes), str(a.active_requests))
             for a in adapters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 3, 4, 5}  # numbers right-aligned
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    if not adapters:
        lines = ["no adapters this key may use"]
    lines.append(f"base model: {'this key may use it' if base_allowed else 'not for this key'}")
    return "\n".join(lines)


def _size(n: int) -> str:
    """Bytes as ``client list`` shows them: "no" for 0 (not resident), else KiB under 1 MiB, else MiB."""
    if n == 0:
        return "no"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _info(client: NloraClient, args: argparse.Namespace) -> int:
    info = client.server_info()
    _print({f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields})
    return 0


def _upload(client: NloraClient, args: argparse.Namespace) -> int:
    _print(_info_dict(client.upload_adapter(args.name, args.adapter_dir)))
    return 0


def _swap(client: NloraClient, args: argparse.Namespace) -> int:
    _print(_info_dict(client.swap_adapter(args.name, args.n_file, args.if_version)))
    return 0


def _unload(client: NloraClient, args: argparse.Namespace) -> int:
    resp = client.unload_adapter(args.name, args.force)
    _print({"name": resp.ref.name, "version": resp.ref.version, "content_hash": resp.ref.content_hash,
            "aborted_requests": resp.aborted_requests, "draining_requests": resp.draining_requests})
    return 0


def _load(client: NloraClient, args: argparse.Namespace) -> int:
    _print(_info_dict(client.load_adapter(args.name, args.version)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nlora-serve client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_client_arguments(parser)
    return run_client(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
