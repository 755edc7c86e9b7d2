"""``nlora-serve serve``: the gRPC server on one base model, until SIGTERM / SIGINT.

    python -m nlora_serve.serving.serve_cli --adapter-dir ./adapters --example-tenants 4

Shutdown is graceful: health turns NOT_SERVING, new Generate calls get UNAVAILABLE, running
streams get ``--drain-seconds`` to finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from nlora_serve.adapters.loader import DEFAULT_MAX_RANK
from nlora_serve.adapters.manager import AdapterLimits
from nlora_serve.models import load_base, resolve_dtype
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.config import EngineConfig, SchedulerConfig
from nlora_serve.serving.engine import LLMEngine
from nlora_serve.serving.example_tenants import ensure_example_tenants
from nlora_serve.serving.grpc_convert import server_info
from nlora_serve.serving.grpc_server import NloraServer
from nlora_serve.serving.server_config import ServerConfig

log = logging.getLogger("nlora_serve.serve")
MiB = 1 << 20


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nlora-serve serve``."""
    d = ServerConfig()
    a = parser.add_argument
    a("--host", default=d.host, help="interface to listen on; anything but loopback needs --tenants-file "
                                     "(default: %(default)s)")
    a("--port", type=int, default=d.port, help="gRPC port, 0 = any free one (default: %(default)s)")
    a("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a Hugging Face directory or a .gguf file")
    a("--cache-dir", default=argparse.SUPPRESS, help="prepared-model cache root (default $NLORA_SERVE_CACHE)")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="compute dtype: auto = bf16 where the CPU or GPU has fast bf16, else fp32")
    a("--adapter-dir", default="./nlora-adapters", help="adapter store, rebuilt at start (default: %(default)s)")
    a("--tenants-file", default=None, help="JSON/TOML file of tenant and admin key hashes and grants; "
                                           "without it there is no auth and the server binds to loopback only")
    a("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (default: off)")
    a("--max-queue", type=int, default=d.max_queue, help="running + waiting requests at most; beyond that "
                                                         "RESOURCE_EXHAUSTED (default: %(default)s)")
    a("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a request may ask (default: %(default)s)")
    a("--max-model-len", type=int, default=2048, help="prompt + output tokens per sequence (default: %(default)s)")
    a("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="refuse adapters above this rank (default: %(default)s)")
    a("--max-adapter-bytes", type=int, default=d.max_adapter_bytes,
      help="largest upload (config + safetensors) or swap payload in bytes (default: %(default)s)")
    a("--max-loras", type=int, default=AdapterLimits().max_loras,
      help="untied adapters resident at once, LRU beyond (default: %(default)s)")
    a("--adapter-memory", type=int, default=AdapterLimits().adapter_memory // MiB,
      help="MiB all tied tenants' N may use (default: %(default)s)")
    a("--drain-seconds", type=float, default=d.drain_seconds,
      help="on SIGTERM/SIGINT, how long running streams may finish (default: %(default)s)")
    a("--example-tenants", type=int, default=0, metavar="N",
      help="register N example tied IntTune tenants (tenant-000...) at start when missing (default: 0)")


def build(args: argparse.Namespace):
    """(engine, server, example names) from parsed flags; nothing is bound yet.

    Raises:
        ValueError: a flag out of range (ServerConfig / EngineConfig name it).
        AuthError: a bad tenants file. ModelError: a bad model.
    """
    config = ServerConfig(host=args.host, port=args.port, metrics_port=args.metrics_port,
                          tenants_file=args.tenants_file, max_queue=args.max_queue, max_tokens=args.max_tokens,
                          default_max_tokens=min(ServerConfig().default_max_tokens, args.max_tokens),
                          max_adapter_bytes=args.max_adapter_bytes, drain_seconds=args.drain_seconds)
    auth = Authenticator.from_file(args.tenants_file) if args.tenants_file else Authenticator(None)
    dtype = resolve_dtype(args.dtype)
    cache_dir = getattr(args, "cache_dir", None)
    base = load_base(args.model, dtype, cache_dir)
    engine_config = EngineConfig(model=args.model, dtype=dtype, cache_dir=cache_dir, adapter_dir=args.adapter_dir,
                                 scheduler=SchedulerConfig(max_model_len=args.max_model_len),
                                 adapter_limits=AdapterLimits(max_rank=args.max_rank, max_loras=args.max_loras,
                                                              adapter_memory=args.adapter_memory * MiB))
    engine = LLMEngine(engine_config, base)
    examples = ensure_example_tenants(base, engine.adapters, args.example_tenants) if args.example_tenants else []
    server = NloraServer(engine, config, auth, server_info(base, engine_config, config), base.tokenizer())
    return engine, server, examples


def client_hint(server: NloraServer, examples: list[str]) -> str:
    """A ready-to-paste client command for this server."""
    key = " --api-key $NLORA_API_KEY" if server.generation.auth.enabled else ""
    adapter = f" --adapter {examples[0]}" if examples else ""
    host = "127.0.0.1" if server.config.host in ("0.0.0.0", "::") else server.config.host
    return (f"nlora-serve client generate --server {host}:{server.port}{key}{adapter} "
            "--message \"Why serve many adapters on one base model?\"")


async def serve(server: NloraServer, examples: list[str]) -> bool:
    """Start, print the client hint, wait for SIGTERM/SIGINT, drain. Returns True when drained."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not server.generation.auth.enabled:
        log.warning("no --tenants-file: auth is OFF, every caller is admin; listening on loopback %s only",
                    server.config.host)
    print(f"ready on {server.config.host}:{server.port}; try:\n  {client_hint(server, examples)}", flush=True)
    await stop.wait()
    log.info("shutting down: draining running streams for up to %.0f s", server.config.drain_seconds)
    return await server.shutdown()


def run_serve(args: argparse.Namespace) -> int:
    """Run ``serve`` until a signal; returns 0 after a graceful drain (also when streams had to be
    cancelled at the end of the grace period: that is logged)."""
    engine, server, examples = build(args)
    try:
        asyncio.run(serve(server, examples))
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nlora-serve serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
