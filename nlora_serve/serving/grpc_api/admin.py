"""The AdapterAdmin service: load, upload, hot-swap and unload adapters while traffic flows.

Every RPC needs an admin key (PERMISSION_DENIED for a tenant key). Validation and the durable
write run in a worker thread, so streams keep flowing on the event loop meanwhile.

Status codes: a name outside ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` (e.g. one that would leave the
store) and an adapter the loader refuses are INVALID_ARGUMENT with the loader's message; a payload
over ``--max-adapter-bytes`` is RESOURCE_EXHAUSTED (refused from the header, before any chunk is
buffered); a size or sha256 mismatch is INVALID_ARGUMENT; a stale ``if_version`` is
FAILED_PRECONDITION; an unknown name is NOT_FOUND; an upload while :data:`MAX_UPLOADS_IN_FLIGHT` are in
flight is RESOURCE_EXHAUSTED (reason ``uploads_busy``), before it reads a byte. Every refusal carries its reason in the trailing
metadata ``nlora-reason`` (status.py's table: ``invalid_argument``, ``not_found``, ``pool_full``,
``store_write_failed``, ...; what HTTP's /v1/load_lora_adapter answers as its error ``code``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque

import grpc

from nlora_serve import log_format
from nlora_serve.adapters.names import validate_name
from nlora_serve.adapters.runtime.version import AdapterNotFound, ConcurrentChange, VersionConflict
from nlora_serve.adapters.store import CONFIG_FILE, WEIGHTS_FILE
from nlora_serve.errors import AdapterError, NloraError, shown
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.grpc_api import convert
from nlora_serve.serving.grpc_api.spool import Spool
from nlora_serve.serving.admin_log import AdminRefusals, log_done
from nlora_serve.serving.auth import Authenticator
from nlora_serve.engine.api import Engine
from nlora_serve.serving.status import TooLarge, UploadsBusy, abort, adapter_manager, status_of
from nlora_serve.serving.metrics import ServerMetrics
from nlora_serve.serving.request_log import client_address, peer
from nlora_serve.serving.server_config import ServerConfig

log = logging.getLogger(__name__)
SWAP_SAMPLES = 4096  # recent swap latencies kept for tests and benchmarks (seconds)
# UploadAdapter calls in flight at most. Each holds up to --max-adapter-bytes (256 MiB by default) in
# memory while it streams, and again as bytes while it waits in a worker thread of the default executor
# for the registry's write lock (registrations are serialised): a script uploading 50 tenants at
# once could hold 50 x the payload in RAM and every thread of that executor, where HTTP's whole
# (non-streamed) responses are turned into JSON too. vLLM caps nothing here, but its
# /v1/load_lora_adapter reads from its own disk; this takes bytes from the network.
MAX_UPLOADS_IN_FLIGHT = 4


class AdminServicer(pb_grpc.AdapterAdminServicer):
    """Operators' RPCs over an engine's adapter manager."""

    def __init__(self, engine: Engine, config: ServerConfig, auth: Authenticator, metrics: ServerMetrics):
        self.engine, self.config, self.auth, self.metrics = engine, config, auth, metrics
        # SwapAdapter receipt -> new version admitted (switched to in the registry, durable write
        # included), taken in the worker thread: the reply's trip back is the client's round trip
        self.swap_seconds: deque[float] = deque(maxlen=SWAP_SAMPLES)
        self.refusals = AdminRefusals(log)

    uploads = 0  # UploadAdapter calls in flight (event loop only)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext):
        return await self._guard(context, "LoadAdapter", self._load(request.name, request.version))

    async def UploadAdapter(self, request_iterator, context: grpc.aio.ServicerContext):
        progress: list[str] = []
        return await self._guard(context, "UploadAdapter", self._upload(request_iterator, context, progress),
                                 progress)

    async def SwapAdapter(self, request: pb.SwapAdapterRequest, context: grpc.aio.ServicerContext):
        return await self._guard(context, "SwapAdapter", self._swap(request, time.perf_counter()))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext):
        return await self._guard(context, "UnloadAdapter", self._unload(request))

    async def _guard(self, context: grpc.aio.ServicerContext, rpc: str, work, progress: list[str] | None = None):
        """Authorize as admin, then run ``work``; expected failures become status codes. A change
        done is logged (INFO): what, by whom, how long; so is a refusal of a known key's call
        (admin_log.py), and a call its client cancelled (with ``progress``' last word: how far it got)."""
        principal = None
        start = time.perf_counter()
        try:
            principal = self.auth.authenticate(context.invocation_metadata())
            principal.require_admin(rpc)
            start = time.perf_counter()
            reply = await work
            ms = 1e3 * (time.perf_counter() - start)
            log_done(log, rpc, principal.name, context.peer(), f"{_done(reply)} ({ms:.0f} ms)",
                     adapter=reply.ref.name, adapter_version=reply.ref.version, duration_ms=round(ms))
            return reply
        except asyncio.CancelledError:  # the client cancelled (or went away): no refusal, the call is gone
            if principal is not None and principal.is_admin:
                where = client_address(context.peer())
                # the worker thread a change was handed to is not stopped by a cancel: it may still land
                note = progress[-1] if progress else ("a change already handed to its worker thread still completes "
                                                      "(ListAdapters shows what serves)")
                ms = 1e3 * (time.perf_counter() - start)
                log.info("%s by %r from %s cancelled by the client after %.0f ms: %s", rpc, principal.name, where,
                         ms, note, extra=log_format.fields(event="admin_cancelled", operation=rpc,
                                                           caller=principal.name, client=peer(context.peer()),
                                                           duration_ms=round(ms), note=note))
            raise
        except NloraError as exc:
            work.close()  # never started when auth failed; silences "never awaited"
            code, reason = status_of(exc)
            if principal is not None:  # a key the tenants file knows (admin_log.py)
                self.refusals.refused(rpc, principal, code.name, exc, context.peer())
            await abort(context, code, str(exc), reason)

    def _manager(self):
        return adapter_manager(self.engine)

    async def _load(self, name: str, version: int = 0) -> pb.AdapterInfo:
        """Serve ``name``'s newest stored version again (``version`` 0), or roll it back to a
        version kept in the store (``serve --keep-versions``) as its next version."""
        manager = self._manager()
        validate_name(name)
        self.config.check_adapter_name(name)
        current = {v.name: v for v in manager.versions()}.get(name)
        if current is not None and version in (0, current.version):
            return convert.adapter_info(current, self.engine.is_resident(current))
        store = manager.registry.store
        kept = store.versions(name)
        if version and version not in kept:
            raise AdapterNotFound(f"adapter {name!r} has no version {version} kept in the adapter store (kept: "
                                  f"{', '.join(f'v{v}' for v in kept) or 'none'}; serve --keep-versions N keeps "
                                  "the newest N)")
        try:
            stored = store.get(name, version) if version else store.latest(name)
        except AdapterError:  # listed as kept just now: another admin's upload or rollback pruned it meanwhile
            raise ConcurrentChange(f"adapter {name!r} v{version}: pruned from the adapter store meanwhile by another "
                                   "admin's upload or rollback of the name; retry (adapters versions NAME lists "
                                   "those kept)") from None
        if stored is None:
            raise AdapterNotFound(f"adapter {name!r} has no stored version in the adapter store")
        start = time.perf_counter()
        # the read too (up to --max-adapter-bytes) in the thread
        version = await asyncio.to_thread(_load_stored, manager, stored, rollback=version != 0)
        self.metrics.load.observe(time.perf_counter() - start)
        return convert.adapter_info(version, self.engine.is_resident(version))

    async def _upload(self, parts, context: grpc.aio.ServicerContext | None = None,
                      progress: list[str] | None = None) -> pb.AdapterInfo:
        """``progress`` gets a line on how far the upload got, for the log line of a cancelled call."""
        manager = self._manager()
        if self.uploads >= MAX_UPLOADS_IN_FLIGHT:
            raise UploadsBusy(f"{self.uploads} uploads are in flight on this server, the most it takes at once "
                              f"(each holds up to --max-adapter-bytes in memory): retry when one has ended")
        self.uploads += 1
        slot = {"handed": False}  # True once the worker thread holds it (given back as that ends)
        try:
            return await self._upload_one(manager, parts, context, progress, slot)
        finally:
            if not slot["handed"]:
                self.uploads -= 1

    def _upload_thread_ended(self, work: asyncio.Future) -> None:
        """The upload's worker thread ended: its slot is free (on the event loop, as the count)."""
        self.uploads -= 1
        if not work.cancelled():
            work.exception()  # retrieved: a handler cancelled meanwhile never awaits it

    async def _upload_one(self, manager, parts, context, progress, slot) -> pb.AdapterInfo:
        spool = Spool()  # not a bytearray: its copy into bytes held the GIL, so the loop, for 0.16-0.26 s
        progress = [] if progress is None else progress
        progress.append("before its header; nothing stored")
        try:
            header = await self._receive(parts, spool, context, progress)
        except BaseException:
            spool.close()  # a memfd: nothing of a refused or cancelled upload is left, in memory or on disk
            raise
        progress.append(f"all {spool.size} bytes received, the store write goes on (its adapter is served if it "
                        "passes the checks)")

        def register():  # in a worker thread: the read into bytes (GIL released: spool.py) and the hash
            try:
                weights = spool.read()
            finally:
                spool.close()
            digest = hashlib.sha256(weights).hexdigest()
            if header.safetensors_sha256 and header.safetensors_sha256.lower() != digest:
                raise AdapterError(f"upload of {header.name!r}: adapter_model.safetensors has sha256 {digest}, "
                                   f"the header says {shown(header.safetensors_sha256, 64)!r}")
            return manager.register(header.name, {CONFIG_FILE: header.adapter_config_json.encode(),
                                                  WEIGHTS_FILE: weights})

        start = time.perf_counter()
        # a cancel does not stop the thread, which holds the payload as bytes until it ends: so does
        # the upload's slot of MAX_UPLOADS_IN_FLIGHT (given back at the cancel, the cap bounded nothing)
        work = asyncio.ensure_future(asyncio.to_thread(register))
        slot["handed"] = True
        work.add_done_callback(self._upload_thread_ended)
        version = await asyncio.shield(work)
        self.metrics.load.observe(time.perf_counter() - start)
        return convert.adapter_info(version, self.engine.is_resident(version))

    async def _receive(self, parts, spool: Spool, context: grpc.aio.ServicerContext | None = None,
                       progress: list[str] | None = None) -> pb.UploadHeader:
        """The header; the exact number of safetensors bytes it announced go into ``spool`` (read
        back into bytes by the caller, off the event loop).

        Raises:
            AdapterError: no header first, a bad name, a second header, a size mismatch.
            TooLarge: the announced total is over ``max_adapter_bytes``.
            asyncio.CancelledError: the client cancelled the call (see :func:`_cancelled_short`).
        """
        header = None
        progress = [] if progress is None else progress
        async for part in parts:
            kind = part.WhichOneof("part")
            if header is None:
                if kind != "header":
                    raise AdapterError("UploadAdapter: the first message must be the header")
                header = part.header
                validate_name(header.name)
                self.config.check_adapter_name(header.name)
                self._check_size(header.name, len(header.adapter_config_json.encode()) + header.safetensors_bytes)
            elif kind != "chunk":
                raise AdapterError("UploadAdapter: only one header, then chunks")
            elif spool.size + len(part.chunk) > header.safetensors_bytes:
                raise AdapterError(f"upload of {header.name!r}: chunks exceed the announced "
                                   f"{header.safetensors_bytes} bytes of adapter_model.safetensors")
            else:
                spool.append(part.chunk)
            if header is not None:
                progress[-1] = (f"{spool.size} of {header.safetensors_bytes} bytes of {header.name!r} received; "
                                "nothing stored")
        if (header is None or spool.size != header.safetensors_bytes) and context is not None:
            await _cancelled_short(context)
        if header is None:
            raise AdapterError("UploadAdapter: empty upload (no header)")
        if spool.size != header.safetensors_bytes:
            raise AdapterError(f"upload of {header.name!r}: received {spool.size} bytes of "
                               f"adapter_model.safetensors, the header announced {header.safetensors_bytes}")
        return header

    def _check_size(self, name: str, total: int) -> None:
        if total > self.config.max_adapter_bytes:
            raise TooLarge(f"adapter {name!r}: {total} bytes is over the server's --max-adapter-bytes "
                           f"{self.config.max_adapter_bytes}")

    async def _swap(self, request: pb.SwapAdapterRequest, received: float) -> pb.AdapterInfo:
        manager = self._manager()
        validate_name(request.name)
        weights = request.n_safetensors  # (each read of a bytes field copies it)
        self._check_size(request.name, len(weights))
        current = manager.registry.get(request.name)
        if not current.swaps_n:
            raise AdapterError(f"adapter {request.name!r} is {current.flavour}, not a tied IntTune tenant: "
                               "SwapAdapter replaces only N; upload the whole adapter with UploadAdapter "
                               "(`nlora-serve adapters upload`)")
        if_version = request.if_version if request.HasField("if_version") else None

        def swap():  # in a worker thread: the event loop keeps serving streams meanwhile
            version = manager.swap(request.name, weights, if_version)
            return version, time.perf_counter() - received  # admitted: new requests get it from now

        version, elapsed = await asyncio.to_thread(swap)
        self.metrics.swap.observe(elapsed)
        self.swap_seconds.append(elapsed)
        return convert.adapter_info(version, self.engine.is_resident(version))

    async def _unload(self, request: pb.UnloadAdapterRequest) -> pb.UnloadAdapterResponse:
        self._manager()
        validate_name(request.name)
        adapters = self.engine.adapters
        # every version: a forced unload aborts the running requests (and refuses those a response
        # holding one has still to queue); without force, both run
        running, draining = adapters.holders(request.name), adapters.draining(request.name)
        # in a worker thread: the unload waits for the registry's write lock, which an upload or swap
        # holds through its durable write (0.4 s for a 78 MB LoRA here): on the event loop every stream stalled
        version = await asyncio.to_thread(self.engine.unload_adapter, request.name, force=request.force)
        return pb.UnloadAdapterResponse(ref=convert.adapter_ref(version), aborted_requests=running if request.force else 0,
                                        draining_requests=0 if request.force else draining)


# how long a stream that ended short waits for gRPC to say whether its client cancelled it (s)
CANCEL_GRACE_S = 0.2


async def _cancelled_short(context: grpc.aio.ServicerContext) -> None:
    """Let a cancellation that ended a stream reach the handler before the stream is refused as short.

    A client's cancel mid-upload ends the server's message iterator as a half-close does; gRPC
    cancels the handler's task a moment later, from the close it reads apart. Refused at once,
    the upload was logged as an admin's INVALID_ARGUMENT refusal ("received 1000 bytes ..., the
    header announced 100000") for what was the client's cancel. A stream that really was short
    (a client bug) is refused :data:`CANCEL_GRACE_S` later at most.

    Raises:
        asyncio.CancelledError: the client cancelled the call.
    """
    deadline = time.monotonic() + CANCEL_GRACE_S
    while time.monotonic() < deadline and not context.done():
        await asyncio.sleep(0.005)  # gRPC's cancel is delivered into this task as CancelledError


def _load_stored(manager, stored, rollback: bool = False):
    """Register ``stored``'s files (the newest stored version of an unloaded name, or with
    ``rollback`` a kept one to roll back to) as its next version.

    A plain load registers only while the name is not served, so that of concurrent loads of one
    unloaded name the first registers it and the others answer the version it made. Before, each
    made a version of the same files (20 loads: 8 versions) and the rest, their files pruned by
    the others' --keep-versions meanwhile, were NOT_FOUND.

    Raises:
        ConcurrentChange: the folder was removed meanwhile (another admin's upload or rollback of the
            name pruned it) and the name is not served: ABORTED / 409, a conflict to retry.
        AdapterError: as :meth:`AdapterManager.register`, or the store's refusal of the folder.
    """
    try:
        files = manager.registry.store.read_files(stored.path)
    except FileNotFoundError:
        if not rollback and (served := _served(manager, stored.name)) is not None:
            return served
        raise ConcurrentChange(f"adapter {stored.name!r} v{stored.version}: its stored files were removed meanwhile "
                               "(another admin's upload or rollback of the name); retry") from None
    try:
        return manager.register(stored.name, files, None if rollback else 0)
    except VersionConflict:  # a plain load's: served meanwhile, by a concurrent load or an upload
        if (served := _served(manager, stored.name)) is not None:
            return served
        raise


def _served(manager, name: str):
    """``name``'s current version, or None while it is not served."""
    return {v.name: v for v in manager.versions()}.get(name)


def _done(reply: pb.AdapterInfo | pb.UnloadAdapterResponse) -> str:
    """An admin RPC's reply as a log line's words."""
    if isinstance(reply, pb.UnloadAdapterResponse):
        return (f"adapter {reply.ref.name!r} v{reply.ref.version} unloaded ({reply.aborted_requests} requests "
                f"aborted, {reply.draining_requests} draining)")
    return f"adapter {reply.ref.name!r} v{reply.ref.version} serving ({reply.flavour}, rank {reply.rank})"
