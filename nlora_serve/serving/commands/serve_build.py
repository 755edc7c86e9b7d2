"""``nlora-serve serve``'s start-up (serve.py runs what this builds): the flags turned into the
engine's and the server's configs, the base model loaded, the engine started, the ``--adapter``
folders and ``--example-tenants`` registered into the adapter store (one batch of writes, committed
once the server is up), and the server built; nothing is bound yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from nlora_serve.adapters.limits import AdapterLimits
from nlora_serve.adapters.runtime.version import restored_summary
from nlora_serve.errors import AdapterError
from nlora_serve.models import load_base
from nlora_serve.models.hub import local_or_hub
from nlora_serve.serving.commands.backend import make_engine
from nlora_serve.serving.commands.engine_flags import device_config
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.serving.commands.example_tenants import ensure_example_tenants
from nlora_serve.serving.generation_config import SamplingDefaults, sampling_defaults
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server import NloraServer
from nlora_serve.serving.commands.serve_checks import (ServeFlags, check_serve_flags, flag_adapter_names, flag_errors,
                                                       server_configs)
from nlora_serve.serving.server_config import ServerConfig, StartupError, default_served_name

log = logging.getLogger("nlora_serve.serve")  # serve's start-up lines, as serve.py's


def build(args: argparse.Namespace, flags: ServeFlags | None = None):
    """(engine, server, hint adapters, batch) from parsed flags; nothing is bound yet. The hint
    adapters are the ones served now that the client hint (serve.py's ``client_hint``) may name, best
    first: the ``--adapter`` ones (trained tenants, e.g. ``make serve``'s ``lower``), then the
    untrained ``--example-tenants``. ``batch`` is the start's adapter-store writes, still open
    (store/batch.py's OpenBatch): the caller commits it once the servers are bound and started
    (serve.py's ``serve``), or aborts it when anything fails before, so that a failed start leaves the
    store as it found it; a build that raises has aborted it.

    Every flag is checked before the model loads, so a typo does not wait for the weights: those
    that need no torch by serve_checks.py (``flags``, its answer when the CLI ran it before this
    module's imports; None: run here; the model's folder resolved there too, converted on first use),
    then the device and dtype, then what needs the model's folder read.

    Raises:
        StartupError: a flag out of range or unusable (the message names it). AuthError: a bad
            tenants file. ModelError: a bad model. AdapterError: an --adapter, example or stored
            adapter named like the served base model (:meth:`ServerConfig.check_adapter_name`).
    """
    flags = check_serve_flags(args) if flags is None else flags
    backend, config, auth = flags.backend, flags.config, flags.auth
    engine_config = _engine_config(args, flags.limits, (flags.scheduler, flags.cache))
    if config.allow_runtime_lora_updating:  # as vLLM warns: lora_path reads this machine's disk
        who = "admin keys" if args.tenants_file else "any local process (no --tenants-file)"
        log.warning("--allow-runtime-lora-updating: %s may load any adapter folder this server can read over "
                    "HTTP's POST /v1/load_lora_adapter%s", who,
                    "" if config.http_port is not None else " (but --http-port is off)")
    path = flags.model_dir
    config = dataclasses.replace(config, served_model_name=config.served_model_name or default_served_name(path),
                                 sampling_defaults=_sampling_defaults(args, path))
    for name in [name for _, name in flag_adapter_names(args)] + flags.stored:
        config.check_adapter_name(name)  # AdapterError
    named = [(name, str(local_or_hub(folder, AdapterError, "adapter"))) for name, folder in args.adapter]
    # each long phase is logged as it starts (seconds each on a small CPU; vLLM's start a minute)
    start = time.perf_counter()
    log.info("loading model %s (%s, %s)...", path, engine_config.device,
             str(engine_config.dtype).removeprefix("torch."))
    base = load_base(str(path), engine_config.dtype, engine_config.cache_dir, engine_config.load_format,
                     engine_config.tokenizer, init_device=engine_config.device)
    if backend is not None:  # vLLM takes a minute to start: refuse an --adapter it cannot serve first
        _check_for_vllm(named, base, engine_config.adapter_limits)
    log.info("model loaded in %.1f s; starting the %s engine and restoring the adapter store %s...",
             time.perf_counter() - start, "vLLM" if backend is not None else "native", args.adapter_dir)
    start = time.perf_counter()
    with flag_errors(args):
        engine = make_engine(engine_config, base, backend)
    batch = None
    try:
        registering = " and ".join(what for what, given in (("the example tenants", args.example_tenants),
                                                              ("--adapter folders", named)) if given)
        log.info("engine started in %.1f s%s", time.perf_counter() - start,
                 f"; registering {registering}..." if registering else "")
        before = {v.name: v.version for v in engine.adapters.versions()}
        # a start that fails leaves the store as it found it: every --adapter folder is checked against
        # the model before anything is written (the examples are made from it), and what was written
        # before a later failure, here or in serve.py's serve() (a port taken), is taken back out (h141: a failed
        # start had written and pruned versions)
        batch = engine.adapters.start_batch()
        named_served = _register_named(engine, named, args.adapter_dir)
        examples = ensure_example_tenants(base, engine.adapters, args.example_tenants) if args.example_tenants else []
        hinted = named_served + examples
        # named, as a restart's restore names what it serves (a first start said nothing of them)
        if added := [v for v in engine.adapters.versions() if before.get(v.name) != v.version]:
            log.info("%s", restored_summary(added, args.adapter_dir, done="registered", where="into the store"))
        if isinstance(engine, LLMEngine):  # CUDA: the adapters' kernels compile before the first request
            engine.warm_up()
        server = NloraServer(engine, config, auth, server_info(base, engine_config, config, args.backend),
                             base.tokenizer())
    except BaseException:
        if batch is not None:
            batch.abort()
        engine.shutdown()  # its step thread (and vLLM's workers) would outlive a refused start
        raise
    return engine, server, hinted, batch


def _check_for_vllm(named: list[tuple[str, str]], base, limits) -> None:
    """Each ``--adapter NAME=DIR`` read as registration will read it, and checked for what vLLM's
    LoRA cannot hold, before vLLM starts (registration comes after the engine is up).

    Raises:
        AdapterError: naming the flag: ``--adapter NAME=DIR: <why>``.
    """
    from nlora_serve.adapters.loader import read_adapter
    from nlora_serve.adapters.file_read import check_folder
    from nlora_serve.engine.vllm_backend.adapters import check_servable

    for name, folder in named:
        try:
            check_folder(folder, limits.max_adapter_bytes)  # a FIFO config blocked this read for good
            check_servable(read_adapter(folder, base, max_rank=limits.max_rank, max_bytes=limits.max_adapter_bytes))
        except AdapterError as exc:
            raise AdapterError(f"--adapter {name}={folder}: {exc}") from None


def _register_named(engine: LLMEngine, named: list[tuple[str, str]], store: str) -> list[str]:
    """Register each ``--adapter NAME=DIR`` whose NAME the store neither serves yet nor marks
    unloaded by an operator; returns the named adapters served now. Every DIR is read and checked
    against the model first, so one that does not fit it (another model's: "layer 10 is out of
    range") is refused before any is written. Logs one warning per NAME the store serves with
    other weights than DIR (swapped or uploaded since), naming that version."""
    fresh = set(engine.adapters.start_names([name for name, _ in named]))
    instead = {}
    for name, folder in named:
        try:
            if name in fresh:
                engine.adapters.check_dir(folder)
            else:
                instead[name] = engine.adapters.served_instead(name, folder)
        except AdapterError as exc:  # the reader names a module, not which --adapter it was
            raise AdapterError(f"--adapter {name}={folder}: {exc}") from None
    for name, folder in named:
        try:
            if name in fresh:
                engine.adapters.register_dir(name, folder)
        except AdapterError as exc:
            raise AdapterError(f"--adapter {name}={folder}: {exc}") from None
        if (served_as := instead.get(name)) is not None:
            log.warning("--adapter %s=%s: the adapter store %s already holds %r, with other weights (swapped or "
                        "uploaded since); serving %s v%d instead of that folder (to serve the folder again, once "
                        "the server is up: `nlora-serve adapters upload --name %s %s`; or start with a fresh "
                        "--adapter-dir)", name, folder, store, name, name, served_as.version, name, folder)
    served = {v.name for v in engine.adapters.versions()}
    return [name for name, _ in named if name in served]


def _configs(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    """The server's and the engine's configs from the flags (serve_checks.py's ranges, then the
    device's and dtype's, which load torch), without the checks that touch the disk or the ports.

    Raises:
        StartupError: a flag out of range, in the flag's words.
    """
    config, limits, scheduler, cache = server_configs(args)
    return config, _engine_config(args, limits, (scheduler, cache))


def _engine_config(args: argparse.Namespace, limits: AdapterLimits,
                   sizes: tuple[SchedulerConfig, CacheConfig]) -> EngineConfig:
    """The engine's config from the checked ``limits`` and ``sizes``, the device and dtype resolved
    (the first of serve's checks that load torch).

    Raises:
        StartupError: --device or another device flag refused, in the flag's words.
    """
    with flag_errors(args):
        return device_config(args, sizes, cache_dir=getattr(args, "cache_dir", None), adapter_dir=args.adapter_dir,
                             adapter_limits=limits, enable_prefix_caching=args.enable_prefix_caching,
                             seed=args.seed, generation_config=args.generation_config)


def _sampling_defaults(args: argparse.Namespace, model_dir: Path) -> SamplingDefaults:
    """--generation-config's and --override-generation-config's defaults, logged as vLLM logs them.

    Raises:
        StartupError: a bad folder or file value (the message names the flag or file and the field).
    """
    try:
        defaults, line = sampling_defaults(args.generation_config, args.override_generation_config, model_dir)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    (log.warning if defaults.as_dict() and args.generation_config != "vllm" else log.info)(line)
    return defaults
