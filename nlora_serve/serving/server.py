"""The grpc.aio server over an :class:`Engine` (DESIGN §6): Generation + AdapterAdmin services,
grpc.health.v1 health, server reflection, Prometheus metrics, graceful drain; with
``ServerConfig.http_port`` also the OpenAI-compatible HTTP API (http_api/routes.py), in the same event
loop over the same engine, keys, admission queue and metrics.

Lifecycle (all on one event loop)::

    server = NloraServer(engine, ServerConfig(port=0), Authenticator(None), info, tokenizer)
    await server.start()          # binds; health SERVING; metrics endpoint when configured
    ...
    await server.shutdown()       # health NOT_SERVING, new requests UNAVAILABLE / 503, drain, stop
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from concurrent.futures import Future

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.auth import Authenticator
from nlora_serve.engine.api import Engine, max_prompt_bytes
from nlora_serve.errors import NloraError
from nlora_serve.models.spec import ModelSpec
from nlora_serve.serving.grpc_api.admin import AdminServicer
from nlora_serve.serving.grpc_api.auth import KeyFirst
from nlora_serve.serving.grpc_api.decode import BoundedDecode
from nlora_serve.serving.admission import Admission
from nlora_serve.serving.health_state import health_answer
from nlora_serve.serving.stream import adapter_versions
from nlora_serve.serving.grpc_api.generate import GenerationServicer
from nlora_serve.serving.grpc_api.limits import message_limits
from nlora_serve.serving.http_api.context import HttpContext
from nlora_serve.serving.http_api.routes import build_app
from nlora_serve.serving.http_api.server import HttpServer
from nlora_serve.serving.metrics import ServerMetrics
from nlora_serve.serving.request_log import RequestLog
from nlora_serve.serving.server_config import ServerConfig, StartupError, is_loopback
from nlora_serve.serving.tenants_reload import reload_off_loop, reload_tenants

log = logging.getLogger(__name__)

SERVICES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Generation", "AdapterAdmin"))
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ABORT_FLUSH_S = 5.0  # after the drain, how long aborted requests get to send their error to the client


def shutdown_reason(grace: float, cut: bool = False, dead: bool = False) -> str:
    """What a request still running when the drain period ends is told (as RequestAborted);
    ``cut``: the operator ended the drain early (a second SIGTERM / SIGINT); ``dead``: the engine
    failed (serve ends the drain at once then), whose reason only the server's log names (a
    tenant is told that it failed, not how)."""
    if dead:
        return "the server is shutting down: its engine failed (the server's log says why), so this request, " \
               "still running, was aborted; retry it on another replica"
    when = ("when the drain was ended early (a second SIGTERM or Ctrl-C)" if cut else
            f"when the drain period (--drain-seconds {grace:g}) ended")
    return f"the server is shutting down: this request was still running {when}, so it was aborted; " \
           "retry it on another replica"


async def wait_idle(idle: asyncio.Event, grace: float, now: asyncio.Event | None = None) -> bool:
    """Wait until ``idle`` is set, for at most ``grace`` seconds, or until ``now`` is set (an
    operator's second signal) if that comes first. Returns whether ``idle`` is set."""
    waits = [asyncio.ensure_future(idle.wait())] + ([asyncio.ensure_future(now.wait())] if now is not None else [])
    try:
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return idle.is_set()


class NloraServer:
    """One gRPC server (and its metrics endpoint) over one engine.

    Args:
        engine: the engine; its ``adapters`` manager backs the admin service.
        config: where to listen and the admission limits.
        auth: keys and grants (``Authenticator(None)``: no auth, loopback only).
        info: what GetServerInfo answers (see :func:`nlora_serve.serving.grpc_api.convert.server_info`).
        tokenizer: renders chat prompts with the model's chat template.

    Raises (constructor):
        ValueError: no auth on a non-loopback host. AdapterError: the engine serves an adapter named
            like the base model's served name (``info.model``; see ServerConfig.check_adapter_name).
    """

    def __init__(self, engine: Engine, config: ServerConfig, auth: Authenticator, info: pb.ServerInfo,
                 tokenizer) -> None:
        if not auth.enabled and not is_loopback(config.host):
            raise ValueError(f"no auth configured: refusing to listen on {config.host!r}; without a tenants "
                             "file the server binds only to loopback (127.0.0.1)")
        config = dataclasses.replace(config, served_model_name=info.model)  # every servicer sees the resolved name
        for version in adapter_versions(engine) or []:
            config.check_adapter_name(version.name)
        self.engine, self.config, self.auth = engine, config, auth
        self.admission = Admission(config.max_queue, config.tenant_queue_shares)
        self.metrics = ServerMetrics(engine.stats, lambda: _residency(engine), lambda: self.admission.inflight,
                                     per_tenant=config.tenant_metrics, request_log=_request_log(config, tokenizer))
        # request-size limits (grpc_api/limits.py): sized by what a legal request of this model can be,
        # which ServerConfig alone does not know
        self.limits = message_limits(_swap_shape(engine), max_prompt_bytes(tokenizer, engine.max_model_len),
                                     engine.max_model_len, config.max_adapter_bytes)
        self.generation = GenerationServicer(engine, config, auth, self.metrics, self.admission, tokenizer, info)
        self.admin = AdminServicer(engine, config, auth, self.metrics)
        self.health = health.aio.HealthServicer()
        self.http = None if config.http_port is None else HttpServer(build_app(HttpContext(
            engine, config, auth, self.metrics, self.admission, tokenizer, info.model)))
        self.port: int | None = None  # the bound gRPC port, after start()
        self.metrics_port: int | None = None  # the bound metrics port, after start() (None: off)
        self.http_port: int | None = None  # the bound HTTP API port, after start() (None: off)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Bind and start serving; health turns SERVING.

        Raises:
            StartupError: the gRPC address, the metrics port or the HTTP port cannot be bound (the
                message names it); nothing is left bound or running then.
        """
        # so_reuseport off: a second server on a busy port must fail, not share it silently
        # KeyFirst first: a call without a valid key is refused before its request is read; then
        # each message is held to its method's bound before it is parsed
        self._server = grpc.aio.server(
            interceptors=[KeyFirst(self.auth, self.metrics, self.admin.refusals),
                          BoundedDecode(self.limits, self.metrics, self.auth)],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", self.limits.receive_bytes),
                     ("grpc.max_send_message_length", self.config.max_message_bytes)])
        pb_grpc.add_GenerationServicer_to_server(self.generation, self._server)
        pb_grpc.add_AdapterAdminServicer_to_server(self.admin, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        if self.config.metrics_port is not None:  # first: a gRPC server bound but never started keeps its port
            self.metrics_port = self._bind_metrics()
        if self.http is not None:
            self.http_port = self._bind_http()
        self.port = self._bind_grpc()
        await self._server.start()
        if self.http is not None:
            await self.http.start()
        for service in ("", *SERVICES):
            await self.health.set(service, _SERVING)
        log.info("gRPC on %s:%d%s%s", self.config.host, self.port,
                 f", metrics on http://{self.config.host}:{self.metrics_port}/metrics" if self.metrics_port else "",
                 f", OpenAI-compatible HTTP on http://{self.config.host}:{self.http_port}/v1 (metrics at /metrics)"
                 if self.http_port else "; no HTTP API (--http-port off; --http-port PORT serves the OpenAI-compatible one)")

    def _bind_metrics(self) -> int:
        host, port = self.config.host, self.config.metrics_port
        try:
            return self.metrics.serve_http(  # /health as the HTTP API's, for a gRPC-only server's HTTP probe
                host, port, lambda: health_answer(self.engine.dead_reason, self.admission.draining))
        except OSError as exc:
            raise StartupError(f"cannot bind the metrics port {host}:{port} (--metrics-port): "
                               f"{exc.strerror or exc}") from exc

    def _bind_http(self) -> int:
        try:
            return self.http.bind(self.config.host, self.config.http_port)
        except StartupError:
            self.metrics_port = None
            self.metrics.close()
            raise

    def _bind_grpc(self) -> int:
        try:
            port = self._server.add_insecure_port(self.config.address)
        except RuntimeError:  # grpc's "Failed to bind to address ..."
            port = 0
        if not port:
            self._server, self.metrics_port, self.http_port = None, None, None
            self.metrics.close()
            if self.http is not None:
                self.http.close()
            raise StartupError(f"cannot bind the gRPC address {self.config.address} (--host/--port): it is in "
                               "use or not an address of this machine")
        return port

    def reload_tenants(self) -> bool:
        """Re-read ``config.tenants_file`` (serve's SIGHUP): True when the new file is in force; a
        file the loader refuses, or a server without one, changes nothing (tenants_reload.py)."""
        return reload_tenants(self.auth, self.config.tenants_file, self.engine)

    def reload_tenants_soon(self) -> Future:
        """:meth:`reload_tenants` on the reload thread (tenants_reload.reload_off_loop), after any
        reload asked for before: serve's SIGHUP handler, which returns at once, so the event loop
        keeps serving every stream while a large file is read and checked."""
        return reload_off_loop(self.reload_tenants)

    async def shutdown(self, grace: float | None = None, now: asyncio.Event | None = None) -> bool:
        """Graceful stop: health NOT_SERVING, new Generate calls UNAVAILABLE and HTTP requests 503,
        running requests (both front ends) get up to ``grace`` seconds (default
        ``config.drain_seconds``) to finish, or until ``now`` is set (serve's second signal); the
        rest are then aborted with :func:`shutdown_reason`, so that each client is told (gRPC
        ABORTED, an HTTP 409 error or SSE error event), and get up to :data:`ABORT_FLUSH_S` to send
        that; then the servers stop.

        Returns True when every stream finished within the grace period.
        """
        grace = self.config.drain_seconds if grace is None else grace
        self.admission.start_draining()
        await self.health.enter_graceful_shutdown()
        drained = await wait_idle(self.admission.idle, grace, now)
        if not drained:
            cut = now is not None and now.is_set()
            dead = self.engine.dead_reason is not None  # serve() then sets ``now`` itself: no signal came
            log.warning("%d streams still running %s; aborting them", self.admission.inflight,
                        "as the engine is dead" if dead else "as the drain was ended early" if cut
                        else f"after {grace:.1f} s of drain")
            self.engine.abort_all(shutdown_reason(grace, cut, dead))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.admission.idle.wait(), timeout=ABORT_FLUSH_S)
        if self.http is not None:
            await self.http.stop()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        self.metrics.close()
        return drained


def _swap_shape(engine: Engine) -> tuple[ModelSpec, int] | None:
    """(base model spec, max rank) that bound a swap payload; None without an adapter store."""
    try:
        manager = engine.adapters
    except NloraError:  # ``engine.adapters`` raises without an adapter store
        return None
    return manager.base.spec, manager.limits.max_rank


def _residency(engine: Engine) -> tuple[int, int]:
    """(adapter versions resident, bytes they hold) over the current versions (Engine.is_resident)."""
    resident = [v for v in adapter_versions(engine) or [] if engine.is_resident(v)]
    return len(resident), sum(v.held_bytes for v in resident)


def _request_log(config: ServerConfig, tokenizer) -> RequestLog | None:
    """``--enable-log-requests``' log (prompts decoded with ``tokenizer``), or None when off."""
    if not config.enable_log_requests:
        return None
    decode = None if tokenizer is None else tokenizer.decode
    return RequestLog(config.max_log_len, decode)
