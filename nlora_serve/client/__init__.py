"""Clients of the nlora-serve gRPC server: sync and asyncio, typed deltas and errors.

They depend only on ``nlora_serve.proto`` (never on the server's code).
"""

from nlora_serve.client.aio import AsyncNloraClient
from nlora_serve.client.sync import NloraClient
from nlora_serve.client.types import (AdapterInfo, DeadlineExceeded, Delta, FailedPrecondition, InvalidArgument,
                                      InvalidInput, NloraClientError, NotFound, PermissionDenied,
                                      ResourceExhausted, Unauthenticated, Unavailable, Usage)

__all__ = [
    "AdapterInfo", "AsyncNloraClient", "DeadlineExceeded", "Delta", "FailedPrecondition", "InvalidArgument",
    "InvalidInput", "NloraClient", "NloraClientError", "NotFound", "PermissionDenied", "ResourceExhausted",
    "Unauthenticated", "Unavailable", "Usage",
]
