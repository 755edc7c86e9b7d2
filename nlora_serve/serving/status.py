"""Expected failures -> gRPC status codes and HTTP statuses (DESIGN §6), in one table that both
front ends read, so a failure means the same thing over gRPC and over the OpenAI-compatible HTTP API.

Order matters: subclasses come before their bases (AdapterNotFound before AdapterError).

Every gRPC error leaves through :func:`abort`, which bounds its details (:func:`details`).
"""

from __future__ import annotations

import grpc

from nlora_serve.adapters.runtime.version import AdapterNotFound, ConcurrentChange, VersionConflict
from nlora_serve.adapters.runtime.residency import AdapterLoadFailed, PoolFull
from nlora_serve.adapters.store.durable import StoreReadError, StoreWriteError
from nlora_serve.adapters.store.sums import StoredHashMismatch
from nlora_serve.errors import MAX_ERROR_CHARS, AdapterError, NloraError, capped
from nlora_serve.proto import REASON_KEY
from nlora_serve.serving.auth import PermissionDenied, Unauthenticated
from nlora_serve.engine.api import EngineDead, RequestAborted
from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.engine.structured_output.grammar_compiler import CompileBusy


# UTF-8 bytes of a status's details at most: gRPC percent-encodes each non-ASCII byte into the
# grpc-message trailer (3 bytes each), and a client refuses trailers over its metadata limit (8 KiB
# soft, 16 KiB hard by default) with RESOURCE_EXHAUSTED, which would hide the status the server meant
MAX_DETAILS_BYTES = 2048


class QueueFull(NloraError):
    """Running + waiting requests are at ``--max-queue`` (reason ``queue_full``); its subclasses
    are one tenant's refusals while the queue has room (:class:`QuotaExceeded`,
    :class:`QueueShareExceeded`)."""


class QuotaExceeded(QueueFull):
    """The caller's tenant has its ``max_concurrent_requests`` (the tenants file) running or
    waiting: a refusal of that tenant alone, counted apart from a full queue (reason
    ``tenant_quota``), so that an alert on ``queue_full`` means the server is busy."""


class QueueShareExceeded(QueueFull):
    """With fair scheduling (``tenant_queue_shares``), the caller's tenant holds its share of the
    free ``--max-queue`` places, its weight x the free places (:func:`~nlora_serve.serving.admission.queue_share`):
    refused even alone on an idle server, at half of ``--max-queue`` for weight 1. That tenant's
    refusal alone, the queue not full (reason ``tenant_queue_share``), so that an alert on
    ``queue_full`` means the whole queue is full."""


class Draining(NloraError):
    """The server is shutting down and admits nothing new."""


class TooLarge(NloraError):
    """An upload or swap payload over ``--max-adapter-bytes``."""


class UploadsBusy(NloraError):
    """UploadAdapter while :data:`~nlora_serve.serving.grpc_api.admin.MAX_UPLOADS_IN_FLIGHT` uploads
    are in flight (each holds up to ``--max-adapter-bytes`` in memory): retry when one ends."""


class BodyTimeout(NloraError):
    """An HTTP request body that did not arrive in time (HTTP 408): an admitted request holds
    its tenant's place while its body is read, so a body held back must not hold it for ever."""


class NoAdapterStore(NloraError):
    """The server was started without an adapter store, so it has no adapters to manage."""


def adapter_manager(engine):
    """``engine.adapters``, the admin routes' way in (gRPC's AdapterAdmin, HTTP's load_lora_adapter).

    Raises:
        NoAdapterStore: the engine was started without an adapter store.
    """
    try:
        return engine.adapters
    except AdapterError:
        raise NoAdapterStore("this server has no adapter store (start it with --adapter-dir)") from None


class RuntimeUpdatingOff(NloraError):
    """HTTP's /v1/load_lora_adapter and /v1/unload_lora_adapter on a server started without
    ``--allow-runtime-lora-updating`` (HTTP 404, as vLLM answers them then)."""


class ResponseNotFound(NloraError):
    """/v1/responses' ``previous_response_id``: this server stores no responses (HTTP 404, as vLLM
    0.32 answers it without its response store)."""

    param = "response_id"  # vLLM's error param


# the reason of a failed engine step (gRPC INTERNAL, HTTP 500): an admitted request's end, never a refusal
ENGINE_ERROR = "engine_error"

# (exception, gRPC status code, HTTP status, rejection reason for nlora_requests_rejected_total and
# the OpenAI error ``code``; RequestAborted ends an admitted request, so it is never counted there)
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, int, str], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401, "unauthenticated"),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403, "permission_denied"),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "tenant_quota"),
    (QueueShareExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "tenant_queue_share"),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "queue_full"),
    (Draining, grpc.StatusCode.UNAVAILABLE, 503, "draining"),
    (EngineDead, grpc.StatusCode.UNAVAILABLE, 503, "engine_dead"),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_argument"),
    (UploadsBusy, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "uploads_busy"),
    (BodyTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, 408, "body_timeout"),
    (NoAdapterStore, grpc.StatusCode.FAILED_PRECONDITION, 404, "not_found"),
    (RuntimeUpdatingOff, grpc.StatusCode.FAILED_PRECONDITION, 404, "not_found"),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND, 404, "not_found"),
    (ConcurrentChange, grpc.StatusCode.ABORTED, 409, "aborted"),  # a race lost: retryable, unlike NOT_FOUND
    (ResponseNotFound, grpc.StatusCode.NOT_FOUND, 404, "not_found"),
    (VersionConflict, grpc.StatusCode.FAILED_PRECONDITION, 409, "invalid_argument"),
    (PoolFull, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "pool_full"),
    (AdapterLoadFailed, grpc.StatusCode.INTERNAL, 500, "adapter_load_failed"),
    (StoredHashMismatch, grpc.StatusCode.INTERNAL, 500, "adapter_load_failed"),  # the store's fault, not the call's
    (StoreReadError, grpc.StatusCode.INTERNAL, 500, "adapter_load_failed"),  # a link or FIFO planted there, EIO: too
    (StoreWriteError, grpc.StatusCode.RESOURCE_EXHAUSTED, 507, "store_write_failed"),
    (RequestAborted, grpc.StatusCode.ABORTED, 409, "aborted"),
    # a RequestError, but for the server's load: retried as a full queue is (a 400 is never retried)
    (CompileBusy, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "compile_busy"),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_argument"),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_argument"),
)
_DEFAULT = (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_argument")


def _row(exc: NloraError) -> tuple[grpc.StatusCode, int, str]:
    return next((row[1:] for row in _TABLE if isinstance(exc, row[0])), _DEFAULT)


def status_of(exc: NloraError) -> tuple[grpc.StatusCode, str]:
    """(gRPC status code, rejection reason) for an expected failure; unknown kinds are INVALID_ARGUMENT."""
    code, _, reason = _row(exc)
    return code, reason


def http_status_of(exc: NloraError) -> tuple[int, str]:
    """(HTTP status, rejection reason) for an expected failure; unknown kinds are 400."""
    _, status, reason = _row(exc)
    return status, reason


def details(message: str) -> str:
    """``message`` as a status's details: at most :data:`~nlora_serve.errors.MAX_ERROR_CHARS`
    characters and :data:`MAX_DETAILS_BYTES` bytes of UTF-8 (before the "message cut" note)."""
    fits = len(message.encode("utf-8", "replace")[:MAX_DETAILS_BYTES].decode("utf-8", "ignore"))
    return capped(message, min(MAX_ERROR_CHARS, fits))


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                reason: str | None = None) -> None:
    """End the call with ``code`` and ``message`` bounded by :func:`details` (raises, as
    ``context.abort`` does); with ``reason`` (:func:`status_of`'s: ``queue_full``, ``tenant_quota``,
    ...) in the trailing metadata under :data:`REASON_KEY`, which tells apart what one code covers."""
    await context.abort(code, details(message), trailing_metadata=((REASON_KEY, reason),) if reason else ())
