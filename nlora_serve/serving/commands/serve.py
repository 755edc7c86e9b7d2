"""``nlora-serve serve``: the gRPC server and the OpenAI-compatible HTTP API (--http-port, 8000 by
default as vLLM's; ``off`` for gRPC only) on one base model, until SIGTERM / SIGINT.

    python -m nlora_serve.serving.commands.serve --adapter-dir ./adapters --example-tenants 4

Shutdown is graceful: health turns NOT_SERVING, new Generate calls get UNAVAILABLE, running
streams get ``--drain-seconds`` to finish; those still running then are aborted and told so (gRPC
ABORTED, HTTP 409 / an SSE error event, naming the shutdown), then the process exits 0. A flag out of range, an
unusable --adapter-dir or a port that cannot be bound prints one ``error:`` line naming it, exit 2
(flags are checked before the model loads). SIGHUP re-reads --tenants-file while serving
(serving/tenants_reload.py): a file the loader refuses changes nothing and is logged at ERROR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from nlora_serve import log_format
from nlora_serve.adapters.store.batch import OpenBatch
from nlora_serve.arg_types import WordsParser
from nlora_serve.cli import _serve_log_format, console_command
from nlora_serve.errors import NloraError
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.threads import threads_for_engine
from nlora_serve.serving.commands.exit_now import STUCK_STEP_JOIN_SECONDS, LoopThreads, exit_now
from nlora_serve.serving.server import NloraServer
from nlora_serve.serving.commands.serve_build import build  # the start-up: flags to an engine and a server
from nlora_serve.serving.commands.serve_checks import ServeFlags
from nlora_serve.serving.commands.serve_flags import add_serve_arguments

log = logging.getLogger("nlora_serve.serve")


ENGINE_WATCH_SECONDS = 1.0  # how often serve() checks that the engine can still serve


def client_hint(server: NloraServer, adapters: list[str]) -> str:
    """A ready-to-paste client command for this server, on ``adapters[0]`` (served adapters, best
    first: see :func:`build`), or on the base model when there is none."""
    # quoted: with $NLORA_API_KEY unset the pasted command sends an empty key (UNAUTHENTICATED) instead of
    # failing on "--api-key: expected one argument"
    key = ' --api-key "$NLORA_API_KEY"' if server.generation.auth.enabled else ""
    adapter = f" --adapter {adapters[0]}" if adapters else ""
    host = "127.0.0.1" if server.config.host in ("0.0.0.0", "::") else server.config.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host  # IPv6 literal
    # the hint's chat prompt is ~40 tokens: leave room for it under a small --max-model-len
    max_tokens = max(1, min(64, server.engine.max_model_len - 48))
    return (f"{console_command()} client generate --server {host}:{server.port}{key}{adapter} "
            f"--max-tokens {max_tokens} --message \"Why serve many adapters on one base model?\"")


def ready_lines(server: NloraServer, adapters: list[str], pid: int | None = None) -> list[str]:
    """What a started server prints, in this order: its address and :func:`client_hint` (on
    ``adapters[0]``); the HTTP API's address (with ``--http-port``); with keys on, which key the
    hint's ``$NLORA_API_KEY`` must hold (a tenant's key works only for an adapter it is granted), and
    the command that re-reads the tenants file (SIGHUP to ``pid``, this process's by default: under
    ``make serve`` the pid a shell shows is make's)."""
    lines = [f"ready on {server.config.host}:{server.port}; try:", f"  {client_hint(server, adapters)}"]
    if server.http_port is not None:
        lines.append(f"OpenAI-compatible HTTP API on http://{server.config.host}:{server.http_port}/v1")
    if server.generation.auth.enabled:
        granted = f"a tenant granted {adapters[0]}" if adapters else "a tenant allowed the base model"
        lines.append(f"  ($NLORA_API_KEY: an admin key, or the key of {granted})")
        lines.append(f"  (kill -HUP {os.getpid() if pid is None else pid} re-reads the tenants file after an edit)")
    return lines


async def serve(server: NloraServer, adapters: list[str], batch: OpenBatch | None = None) -> bool:
    """Start, commit ``batch`` (the start's adapter-store writes, :func:`build`'s), print the client
    hint, wait for SIGTERM/SIGINT (SIGHUP meanwhile reloads the tenants file), drain. Returns True
    when drained.

    Raises:
        StartupError: an address cannot be bound (``batch`` left open: the caller aborts it).
        StoreWriteError: the commit's base-model record refused by the disk (the server stopped).
    """
    await server.start()
    if batch is not None:
        try:
            batch.commit()  # only now: a start refused before (a port taken) leaves the store as it was
        except BaseException:
            await server.shutdown(0.0)
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tenants_soon)  # read and checked off the loop, in order
    if not server.generation.auth.enabled:
        log.warning("no --tenants-file: auth is OFF, every caller is admin; listening on loopback %s only",
                    server.config.host)
    print("\n".join(ready_lines(server, adapters)), flush=True)
    watch = asyncio.create_task(_watch_engine(server.engine, stop))
    await stop.wait()
    watch.cancel()
    # how many requests the stop caught (both front ends: running, queued, or still being read or
    # tokenized); those still running when the period ends are counted again as they are aborted
    now = asyncio.Event()  # a second signal: the requests still running are aborted (and told) at once
    dead = server.engine.dead_reason is not None
    if dead:  # none can finish (a hung step, a failed device): a drain would only delay the exit and restart
        now.set()
        log.info("shutting down: the engine is dead; aborting the %d admitted requests now",
                 server.admission.inflight)
    else:
        log.info("shutting down: draining %d admitted requests for up to %.0f s (a second SIGTERM or Ctrl-C "
                 "ends the drain now)", server.admission.inflight, server.config.drain_seconds)
    for sig in (signal.SIGTERM, signal.SIGINT):  # was ignored: Ctrl-C again did nothing for --drain-seconds
        loop.add_signal_handler(sig, now.set)
    drained = await server.shutdown(now=now)
    if not drained:
        cause = ("as the engine is dead" if dead else "by a second signal" if now.is_set()
                 else f"after --drain-seconds {server.config.drain_seconds:g}")
        log.info("drain ended %s: the requests still running were aborted and told", cause)
    return drained


async def _watch_engine(engine, stop: asyncio.Event, every: float = ENGINE_WATCH_SECONDS) -> None:
    """Set ``stop`` once the engine can serve no more (:attr:`Engine.dead_reason`): the server then
    aborts its requests at once, without a drain (health NOT_SERVING), and exits non-zero, so a
    supervisor restarts it rather than every request failing behind a healthy-looking server (vLLM's
    own server exits on EngineDeadError)."""
    while engine.dead_reason is None:
        await asyncio.sleep(every)
    log.error("the engine died: %s; shutting down", engine.dead_reason)
    stop.set()


def run_serve(args: argparse.Namespace, flags: ServeFlags | None = None) -> int:
    """Run ``serve`` until a signal; returns 0 after a graceful drain (also when requests had to be
    aborted at the end of the grace period: that is logged), 1 when it stopped because the engine
    died; where the native engine's step thread is still in a hung step then, or a call in the
    event loop's worker threads (an admin call) has not returned within STUCK_STEP_JOIN_SECONDS, the
    process exits 1 at once instead (exit_now.py: the interpreter's teardown could wait behind it).
    ``flags``: serve_checks.py's answer for ``args`` where the caller ran it (None: :func:`build`
    runs it).

    Raises:
        StartupError, AuthError, ModelError: the server could not start (see :func:`build`).
    """
    # before the model loads: the native engine's step thread alone runs torch in parallel (vLLM's
    # workers are processes of their own, which take their threads themselves)
    with _hup_not_serving(), threads_for_engine() if args.backend == "native" else contextlib.nullcontext():
        engine, server, adapters, batch = build(args, flags)
        # asyncio.run's default executor, whose threads the loop's close joins (admin calls): not for
        # ever where the engine is dead, as a call there may wait on its hung step (exit_now.py)
        threads = LoopThreads(thread_name_prefix="asyncio")
        try:
            freeze_startup_heap()
            with asyncio.Runner() as runner:  # asyncio.run, with the executor set first
                runner.get_loop().set_default_executor(threads)
                try:
                    drained = runner.run(serve(server, adapters, batch))
                finally:
                    if engine.dead_reason is not None:
                        threads.join_s = STUCK_STEP_JOIN_SECONDS
        except BaseException:
            batch.abort()  # a start that failed (a port taken): its store writes taken back; once committed, nothing
            raise
        finally:
            signal.signal(signal.SIGHUP, _hup_logged)  # the closed loop gave SIGHUP its default back
            dead = engine.dead_reason
            engine.shutdown()
    if dead is not None:
        log.error("exiting with status 1: the engine died (%s)", dead)
        if isinstance(engine, LLMEngine) and engine.step_thread_alive(STUCK_STEP_JOIN_SECONDS):
            exit_now(1, "the engine's step thread is still in its hung step")
        if stuck := threads.busy():  # the interpreter's exit would join them
            exit_now(1, f"the event loop's worker threads {', '.join(stuck)} are still in their calls")
        return 1
    log.info("drained, exiting" if drained else "exiting")
    return 0


@contextmanager
def _hup_not_serving() -> Iterator[None]:
    """SIGHUP only logged while the event loop does not take it (start-up, which reads the tenants
    file, and teardown): its default would end the process. The previous handler comes back after."""
    previous = signal.signal(signal.SIGHUP, _hup_logged)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def _hup_logged(signum, frame) -> None:
    log.warning("SIGHUP while not serving (starting or stopping): the tenants file is not re-read; send it "
                "again once the server is ready")


def freeze_startup_heap() -> None:
    """Move every object start-up made (the model's modules, the tokenizer, the registry: ~340k
    objects on the default model) into the collector's permanent generation, as vLLM's engine core
    does after its start-up. Every full collection walked them all, every stream stalled meanwhile
    (133 ms on a quiet 2-core machine, 140-330 ms loaded), and once more at exit (0.72 s from
    "drained" to the process's end, 1.2-5 s loaded; frozen 0 ms and 0.21 s: bench/gc_pause.py).
    Objects made later are collected as before; a cycle among start-up objects is never freed."""
    gc.collect()  # what start-up left as garbage goes now, not frozen with the rest
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = WordsParser(prog="nlora-serve serve", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # configured before parsing, as nlora-serve serve is: a usage error under --log-format json is JSON too
    log_format.configure("INFO", timed=True, fmt=_serve_log_format(argv))
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(args.log_level)
    try:
        return run_serve(args)
    except NloraError as exc:  # as ``nlora-serve serve`` does: one line, exit 2
        log.debug("serve failed", exc_info=True)
        log_format.error_line(exc, args.log_format)
        return 2


if __name__ == "__main__":
    sys.exit(main())
