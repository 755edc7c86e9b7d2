"""``nlora-serve serve``'s checks that need neither torch nor the model, run before either loads.

A refused start (a flag out of range, two flags on one port, a port in use, an unusable
--adapter-dir or tenants file, two flags naming one adapter, a store another server holds, an
--adapter folder the start would fail to read, a --model that does not exist or is shorter than
--max-model-len) answers in a fraction of a second: nothing here imports torch, transformers or grpc (the CLI runs
:func:`check_serve_flags` before it imports commands/serve.py, which loads them: 2-3 s on a small
CPU; tests/test_serve_generate_start.py checks that a refused start loads no torch).
commands/serve.py goes on from :class:`ServeFlags` with what needs torch (the device, the dtype)
and the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nlora_serve.adapters import config as adapter_config
from nlora_serve.adapters.limits import AdapterLimits
from nlora_serve.adapters.store import AdapterStore
from nlora_serve.engine.config import CacheConfig, SchedulerConfig
from nlora_serve.errors import AdapterError
from nlora_serve.models import read_spec, resolve_model
from nlora_serve.models.hub import local_or_hub
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.commands.backend import backend_config
from nlora_serve.serving.commands.engine_flags import engine_sizes, in_flag_words
from nlora_serve.serving.commands.example_tenants import example_name
from nlora_serve.serving.commands.serve_flags import DEFAULT_HTTP_PORT, MiB
from nlora_serve.serving.server_config import TOOL_CALL_PARSERS, ServerConfig, StartupError

if TYPE_CHECKING:  # its module loads torch: backend_config imports it for --backend vllm only
    from nlora_serve.engine.vllm_backend.config import VllmBackendConfig

# what each port is called in a refusal, as the binds of NloraServer.start word it
_PORT_NAMES = {"port": ("the gRPC address", "--host/--port"), "http_port": ("the HTTP port", "--http-port"),
               "metrics_port": ("the metrics port", "--metrics-port")}


@dataclass(frozen=True, slots=True)
class ServeFlags:
    """``serve``'s flags, checked (:func:`check_serve_flags`): what commands/serve.py builds on.

    ``backend`` is the vLLM backend's config (None: the native engine); ``scheduler`` carries the
    policy and the tenants file's weights; ``stored`` are the adapter store's names at the check;
    ``model_dir`` is --model's prepared folder (:func:`nlora_serve.models.resolve_model`). ``store``
    is the store the check opened, kept open while the flags are: its lock (store/lock.py) is this
    process's from the check on, so a second replica started on the store at the same instant is
    refused at its own check, not ~20 s later when its engine opens the store after the model load
    (the engine's store shares the lock).
    """

    backend: VllmBackendConfig | None
    config: ServerConfig
    limits: AdapterLimits
    scheduler: SchedulerConfig
    cache: CacheConfig
    auth: Authenticator
    stored: list[str]
    model_dir: Path
    store: AdapterStore


def check_serve_flags(args: argparse.Namespace) -> ServeFlags:
    """Every check of ``serve``'s flags that needs neither torch nor the model, in the order a
    refusal names the first one wrong: the backend's flags, the ports' flags, the config ranges,
    the tenants file, --adapter-dir (created, and a probe file written), each port bound once
    and let go, the adapter names the flags give against each other and the store (opened, and
    held open in the answer: one another process serves is refused), each --adapter folder the
    start will read, then --model resolved (the default converted on first use, in a child
    process: this process loads no torch for it) and --max-model-len against its config.

    Raises:
        StartupError: a flag out of range or unusable (the message names it). AuthError: a bad
            tenants file. AdapterError / NloraError: the store is in use or unreadable. ModelError:
            a bad model.
    """
    backend = backend_config(args)  # first: a native engine's flag on --backend vllm is wrong whatever its value
    config, limits, scheduler, cache = server_configs(args)
    auth = Authenticator.from_file(args.tenants_file) if args.tenants_file else Authenticator(None)
    scheduler = dataclasses.replace(scheduler, tenant_weights=auth.weights())
    check_adapter_dir(args.adapter_dir)
    check_ports_free(config)
    store = check_flag_adapter_names(args)
    if args.load_format == "dummy":  # a config.json alone, read as load_base reads it (a missing one
        model_dir = Path(args.model).expanduser().resolve()  # was a FileNotFoundError's traceback here)
        read_spec(model_dir)
    else:
        model_dir = resolve_model(args.model, getattr(args, "cache_dir", None))
    check_model_len(model_dir, args.max_model_len)
    return ServeFlags(backend=backend, config=config, limits=limits, scheduler=scheduler, cache=cache, auth=auth,
                      stored=store.names(warn=False), model_dir=model_dir, store=store)  # the registry's scan warns


def server_configs(args: argparse.Namespace) -> tuple[ServerConfig, AdapterLimits, SchedulerConfig, CacheConfig]:
    """The server's config, the adapter limits and the engine's sizes (:func:`engine_sizes`), from
    the flags; the scheduler has the policy (fair with --tenants-file unless --scheduling-policy).

    Raises:
        StartupError: two endpoints on one port, or a value out of range, in the flag's words.
    """
    policy = args.scheduling_policy or ("fair" if args.tenants_file else "fcfs")
    check_distinct_ports(args)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:  # vLLM's rule, in its words
        raise StartupError("--enable-auto-tool-choice requires --tool-call-parser (here: "
                           f"{' or '.join(TOOL_CALL_PARSERS)})")
    with flag_errors(args):
        config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port, http_port=args.http_port,
                              tenant_metrics=args.tenant_metrics, enable_log_requests=args.enable_log_requests,
                              max_log_len=args.max_log_len, served_model_name=args.served_model_name,
                              allow_runtime_lora_updating=args.allow_runtime_lora_updating,
                              tenants_file=args.tenants_file, max_queue=args.max_queue, max_tokens=args.max_tokens,
                              max_adapter_bytes=args.max_adapter_bytes, drain_seconds=args.drain_seconds,
                              tenant_queue_shares=policy == "fair",
                              enable_auto_tool_choice=args.enable_auto_tool_choice,
                              tool_call_parser=args.tool_call_parser)
        memory = {} if args.adapter_memory is None else {"adapter_memory": args.adapter_memory * MiB}
        limits = AdapterLimits(max_rank=args.max_rank, max_loras=args.max_loras,
                               max_adapter_bytes=args.max_adapter_bytes, keep_versions=args.keep_versions, **memory)
        scheduler, cache = engine_sizes(args, policy=policy)
    return config, limits, scheduler, cache


def check_distinct_ports(args: argparse.Namespace) -> None:
    """Refuse two endpoints on one port, naming both flags (ServerConfig refuses it too, by field).

    Raises:
        StartupError: --port, --http-port or --metrics-port share a port (0, any free one, may repeat).
    """
    flags = [("--port", args.port), ("--http-port", args.http_port), ("--metrics-port", args.metrics_port)]
    for i, (flag, port) in enumerate(flags):
        for other, other_port in flags[i + 1:]:
            if port and port == other_port:
                hint = (f"; --port is the gRPC port here (vLLM's --port is its HTTP port: here --http-port, default "
                        f"{DEFAULT_HTTP_PORT})" if {flag, other} == {"--port", "--http-port"} else "")
                raise StartupError(f"{flag} {port} and {other} {other_port}: one port for two servers{hint}")


@contextmanager
def flag_errors(args: argparse.Namespace) -> Iterator[None]:
    """Turn a config's ValueError ("ServerConfig.max_queue must be ...") into a StartupError in the
    words of the flag that set it: "--max-queue 0: must be ..." (:func:`in_flag_words`)."""
    try:
        yield
    except ValueError as exc:
        raise StartupError(in_flag_words(str(exc), args)) from exc


def check_adapter_dir(adapter_dir: str) -> None:
    """Create the store folder and write a probe file in it, before the model loads.

    Raises:
        StartupError: it cannot be created or written (the message names --adapter-dir and why).
    """
    try:
        root = Path(adapter_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as exc:
        raise StartupError(f"--adapter-dir {adapter_dir}: cannot create or write the adapter store there "
                           f"({exc.strerror or exc})") from exc


def check_model_len(model_dir: Path, max_model_len: int) -> None:
    """--max-model-len against the model's max_position_embeddings (the engine refuses it too, but
    only once the weights are loaded).

    Raises:
        StartupError: it exceeds them (the message names both and the config file).
    """
    limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and max_model_len > limit:
        raise StartupError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
                           f"{limit} ({model_dir / 'config.json'})")


def check_ports_free(config: ServerConfig) -> None:
    """Bind each port the server will listen on (gRPC, --http-port, --metrics-port; 0 picks a free
    one and is not probed) and let it go again, so that a taken port is refused before the model
    loads rather than after it.

    Raises:
        StartupError: a port is in use, or the host is not an address of this machine (the message
            names the flag, as NloraServer.start's refusal would).
    """
    bare = config.host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    for field, (what, flag) in _PORT_NAMES.items():
        port = getattr(config, field)
        if not port:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real binds: TIME_WAIT is free
            try:
                sock.bind((bare, port))
            except OSError as exc:
                where = config.address if field == "port" else f"{config.host}:{port}"
                # h130: a second `make serve` met this; say what holds it and how to move
                make = ", or `make serve GRPC_PORT=N HTTP_PORT=M`" if field != "metrics_port" else ""
                busy = (f" (another server's? stop it, or choose a free one: {flag.split('/')[-1]} N{make})"
                        if exc.errno == errno.EADDRINUSE else "")
                raise StartupError(f"cannot bind {what} {where} ({flag}): {exc.strerror or exc}{busy}") from exc


def check_flag_adapter_names(args: argparse.Namespace) -> AdapterStore:
    """The flags' adapter names (--adapter, --example-tenants) against each other, and the store
    opened for its names (commands/serve.py checks them all against the served model's name once
    the model is resolved). Returns the store, open: the caller holds it (and its lock) until the
    engine's own store has the lock too.

    Raises:
        StartupError: two flags name one adapter, or names that differ only in case (one folder of
            the store on a case-insensitive file system): the later one had registered silently as
            a new version over the earlier (or an example over an --adapter).
        AdapterError: an --adapter folder the start will read is missing or has no readable
            adapter_config.json (:func:`check_flag_adapter_folders`).
        NloraError: the store is in use by another process, or unreadable.
    """
    seen: dict[str, tuple[str, str]] = {}  # case-folded name -> the first (flag, name) of it
    for flag, name in flag_adapter_names(args):
        if (first := seen.get(name.casefold())) is not None:
            case = "" if first[1] == name else (f" (as {first[1]!r}: names differing only in case are one folder "
                                                "of the store on a case-insensitive file system)")
            raise StartupError(f"{flag}: adapter {name!r} is also named by {first[0]}{case}; give each adapter "
                               "its own name")
        seen[name.casefold()] = (flag, name)
    store = AdapterStore(args.adapter_dir)
    check_flag_adapter_folders(args.adapter, store)
    return store


def check_flag_adapter_folders(adapters: list[tuple[str, str]], store: AdapterStore) -> None:
    """Each ``--adapter NAME=DIR`` (``adapters``: (NAME, DIR) pairs) whose DIR the start will read
    (to register NAME, or to compare it with the weights the store serves as NAME) is a folder with a
    valid adapter_config.json (torch-free: adapters/config.py), so that a typo in DIR is named before
    the model and engine load rather than after. A NAME the store marks unloaded by an operator is
    skipped: the start leaves it unloaded without reading DIR (AdapterManager.start_names).

    Raises:
        AdapterError: ``--adapter NAME=DIR: <why>``: DIR is missing or a file, names no cached
            Hugging Face adapter, or its adapter_config.json is missing, unreadable or invalid; or
            NAME is no valid adapter name.
    """
    for name, folder in adapters:
        try:
            if store.is_unloaded(name):
                continue
            adapter_config.read_config(local_or_hub(folder, AdapterError, "adapter"))
        except AdapterError as exc:
            raise AdapterError(f"--adapter {name}={folder}: {exc}") from None
        except OSError as exc:  # EACCES on the folder or its config
            raise AdapterError(f"--adapter {name}={folder}: cannot read it ({exc.strerror or exc})") from None


def flag_adapter_names(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(the flag, the adapter name) of each adapter --adapter and --example-tenants name, in order."""
    flags = [(f"--adapter {name}={folder}", name) for name, folder in args.adapter]
    return flags + [(f"--example-tenants {args.example_tenants}", example_name(i))
                    for i in range(args.example_tenants)]
