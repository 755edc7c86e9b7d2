"""Clients of the nlora-serve gRPC server: sync and asyncio, typed deltas and errors.

They depend only on ``nlora_serve.proto`` (never on the server's code)::

    sync.py      NloraClient (blocking); aio.py: AsyncNloraClient, the same calls awaited
    messages.py  request messages both build; types.py: typed results and errors
    cli.py       ``nlora-serve client ...`` (and ``adapters list|upload|swap|unload|load``)
    bench/       ``nlora-serve bench``, the load tester (its own docstring)
"""

from nlora_serve.client.aio import AsyncNloraClient
from nlora_serve.client.sync import NloraClient
from nlora_serve.client.types import (Aborted, AdapterInfo, DeadlineExceeded, Delta, FailedPrecondition,
                                      InvalidArgument, InvalidInput, NloraClientError, NotFound, PermissionDenied,
                                      ResourceExhausted, TokenLogprob, Unauthenticated, Unavailable, Usage)

__all__ = [
    "Aborted", "AdapterInfo", "AsyncNloraClient", "DeadlineExceeded", "Delta", "FailedPrecondition", "InvalidArgument",
    "InvalidInput", "NloraClient", "NloraClientError", "NotFound", "PermissionDenied", "ResourceExhausted",
    "TokenLogprob", "Unauthenticated", "Unavailable", "Usage",
]
