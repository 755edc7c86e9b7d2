"""What one benchmark request records, and the gRPC target (our server via :class:`AsyncNloraClient`).

A target is an async context manager with ``send(request, run_start) -> RequestResult``; it never
raises for a failed request, it records the failure's code instead. The OpenAI-compatible HTTP
target is in :mod:`nlora_serve.client.bench.openai_target`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from nlora_serve.client.aio import AsyncNloraClient
from nlora_serve.client.bench.workload import BenchRequest
from nlora_serve.client.types import NloraClientError

CONNECT_TIMEOUT_S = 10.0  # how long a run waits for the gRPC server to accept a connection


@dataclass(slots=True)
class RequestResult:
    """Client-side timings of one request (perf_counter seconds), as vLLM ``benchmarks/serve``
    measures them: from just before the request is sent."""

    index: int
    tenant: str | None
    start_s: float  # seconds from the run's start to sending this request
    ttft_s: float | None = None  # send -> first streamed chunk carrying output (None: none came)
    e2e_s: float = 0.0  # send -> end of the stream (or the error)
    chunk_s: list[float] = field(default_factory=list)  # send -> each chunk carrying output, in order
    prompt_tokens: int = 0  # as the server reports it (0 when it does not)
    output_tokens: int = 0  # as the server reports it, else the number of output chunks
    error: str | None = None  # failure code: a gRPC status name, "HTTP 429 queue_full", an exception name
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    def chunk(self, t0: float) -> None:
        """A chunk with output arrived now; ``t0`` is the perf_counter at send."""
        elapsed = time.perf_counter() - t0
        if self.ttft_s is None:
            self.ttft_s = elapsed
        self.chunk_s.append(elapsed)

    def fail(self, code: str, message: str) -> None:
        self.error, self.error_message = code, message[:500]


class GrpcTarget:
    """Our gRPC server. Prompts go as token ids (or text from a prompt file); ``tenant`` is the
    adapter name (None = base model); ``sampling`` adds SamplingParams fields (temperature, ...).

    ``keys``: tenant -> API key, sent by that tenant's requests instead of ``api_key`` (bench/keys.py).

    Error codes are gRPC status names (NOT_FOUND, RESOURCE_EXHAUSTED, ...), with the server's reason
    where it sends one other than the code's name (``RESOURCE_EXHAUSTED queue_full``,
    proto.REASON_KEY); a stream that ends with finish reason "abort" is recorded as ABORTED.
    """

    name = "grpc"

    def __init__(self, server: str, api_key: str | None = None, timeout: float | None = None,
                 ignore_eos: bool = True, keys: Mapping[str, str] | None = None, **sampling):
        self.server, self.api_key, self.timeout, self.keys = server, api_key, timeout, dict(keys or {})
        self.sampling = dict(sampling, ignore_eos=ignore_eos)
        self.client: AsyncNloraClient | None = None

    async def __aenter__(self) -> GrpcTarget:
        """Connect first: a run against a server that is not there would otherwise record one
        UNAVAILABLE per request (thousands in a --duration run), as if the server were overloaded.

        Raises:
            ConnectionError: no server accepted a connection within :data:`CONNECT_TIMEOUT_S`.
        """
        self.client = AsyncNloraClient(self.server, api_key=self.api_key, timeout=self.timeout)
        try:
            await asyncio.wait_for(self.client.channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.client.close()
            raise ConnectionError(f"no gRPC server answers at {self.server} (waited {CONNECT_TIMEOUT_S:g} s): "
                                  "start one (nlora-serve serve) or give --server HOST:PORT, its gRPC port "
                                  "(serve --port, 50051 by default), not its --http-port") from None
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def send(self, req: BenchRequest, run_start: float) -> RequestResult:
        res = RequestResult(req.index, req.tenant, time.perf_counter() - run_start)
        prompt = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        t0 = time.perf_counter()
        try:
            async for delta in self.client.generate(prompt, adapter=req.tenant, max_tokens=req.output_len,
                                                    seed=req.seed, api_key=self.keys.get(req.tenant),
                                                    **self.sampling):
                if delta.token_ids:
                    res.chunk(t0)
                    res.output_tokens += len(delta.token_ids)
                if delta.usage is not None:
                    res.prompt_tokens, res.output_tokens = delta.usage.prompt_tokens, delta.usage.completion_tokens
                if delta.finish_reason == "abort":
                    res.fail("ABORTED", "the server aborted the stream")
        except NloraClientError as exc:  # the server's reason where it says more: RESOURCE_EXHAUSTED tenant_quota
            said = exc.reason and exc.reason != exc.code.name.lower()
            res.fail(f"{exc.code.name} {exc.reason}" if said else exc.code.name, str(exc))
        res.e2e_s = time.perf_counter() - t0
        return res
