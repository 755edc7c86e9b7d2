"""Expected failures -> gRPC status codes (DESIGN §6), in one table.

Order matters: subclasses come before their bases (AdapterNotFound before AdapterError).
"""

from __future__ import annotations

import grpc

from nlora_serve.adapters.registry import AdapterNotFound, VersionConflict
from nlora_serve.adapters.residency import PoolFull
from nlora_serve.errors import AdapterError, NloraError
from nlora_serve.serving.auth import PermissionDenied, Unauthenticated
from nlora_serve.serving.sampling import RequestError


class QueueFull(NloraError):
    """Running + waiting requests are at ``--max-queue``."""


class Draining(NloraError):
    """The server is shutting down and admits nothing new."""


class TooLarge(NloraError):
    """An upload or swap payload over ``--max-adapter-bytes``."""


class NoAdapterStore(NloraError):
    """The server was started without an adapter store, so it has no adapters to manage."""


# (exception, status code, rejection reason for nlora_requests_rejected_total)
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"),
    (Draining, grpc.StatusCode.UNAVAILABLE, "draining"),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED, "invalid_argument"),
    (NoAdapterStore, grpc.StatusCode.FAILED_PRECONDITION, "not_found"),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND, "not_found"),
    (VersionConflict, grpc.StatusCode.FAILED_PRECONDITION, "invalid_argument"),
    (PoolFull, grpc.StatusCode.RESOURCE_EXHAUSTED, "pool_full"),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (AdapterError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
)


def status_of(exc: NloraError) -> tuple[grpc.StatusCode, str]:
    """(status code, rejection reason) for an expected failure; unknown kinds are INVALID_ARGUMENT."""
    for kind, code, reason in _TABLE:
        if isinstance(exc, kind):
            return code, reason
    return grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"
