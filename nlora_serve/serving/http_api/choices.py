"""OpenAI's ``n``: the choices of one request, each an engine request of its own, as one stream.

vLLM V1 runs ``n`` > 1 the same way (v1/engine/parallel_sampling.py: a parent request fans out
into ``n`` child requests with ``n = 1``), and its rule for seeds is kept: with a ``seed`` choice
``i`` samples with ``seed + i`` (so it is the answer a one-choice request with that seed gets),
without one every choice draws from the engine's shared generator. Choice 0 is queued first and
the others once its first delta arrives: its prompt's full KV blocks are computed and committed to
the native engine's prefix cache by then, so the other choices read the prompt from the cache
instead of each prefilling it again (queued at once, all would be admitted in one step, before
any block was committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

from nlora_serve.engine.api import RequestAborted, RequestOutput
from nlora_serve.engine.sampling import GREEDY_BELOW, SamplingParams
from nlora_serve.errors import NloraError
from nlora_serve.serving.http_api.openai import ChatRequest, CompletionRequest, ParamError
from nlora_serve.serving.request_policy import shown_int
from nlora_serve.serving.server_config import ServerConfig

Start = Callable[[int], AsyncIterator[RequestOutput]]  # choice index -> its engine stream, queued now


def check_choices(request: CompletionRequest | ChatRequest, params: SamplingParams, config: ServerConfig) -> None:
    """``n`` and ``best_of`` as vLLM 0.32 takes them (its SamplingParams checks and V1's
    ParentRequest), bounded by the queue: each choice is a request running or waiting.

    Raises:
        ParamError: n below 1 or over ``--max-queue``; n > 1 with greedy sampling (vLLM's rule: the
            choices would be identical); best_of other than null or n; seed + n - 1 past the
            seed's range (choice i samples with seed + i).
    """
    n = request.num_choices
    if n < 1:
        raise ParamError(f"n must be at least 1; got {shown_int(n)}", "n")
    if n > config.max_queue:
        raise ParamError(f"n must be at most the server's --max-queue {config.max_queue} (each choice is a request "
                         f"running or waiting); got {shown_int(n)}", "n")
    if request.best_of is not None and request.best_of != n:
        raise ParamError(f"best_of={shown_int(request.best_of)} is not supported: only null or best_of = n ({n}); "
                         "vLLM 0.32 ignores best_of, this server refuses what it would ignore", "best_of")
    if n > 1 and params.temperature < GREEDY_BELOW:
        raise ParamError(f"n must be 1 when using greedy sampling (temperature 0), got {n} (vLLM's rule: the "
                         "choices would be identical)", "n")
    if params.seed is not None and params.seed + n - 1 >= 1 << 64:
        raise ParamError(f"seed + n - 1 must be below 2^64: choice i samples with seed + i (vLLM's rule); got seed "
                         f"{params.seed} with n {n}", "seed")


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling params of choice ``index``: ``seed + index`` when seeded (vLLM's rule)."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


def start_choices(start: Start, n: int) -> AsyncIterator[RequestOutput]:
    """The deltas of ``n`` choices, each tagged with its ``index``, in the order they come; the
    stream ends once every choice has finished. Closing it (or an error in one choice) aborts every
    unfinished choice at once.

    Raises:
        RequestError, AdapterNotFound, PoolFull: from ``start(0)``, now (nothing is queued then).
        (From the stream:) EngineError, RequestAborted: a choice failed or was aborted; a choice
        that could not be queued (its adapter unloaded meanwhile) is RequestAborted.
    """
    first = start(0)
    return first if n == 1 else _merged(first, start, n)


async def _merged(first: AsyncIterator[RequestOutput], start: Start, n: int) -> AsyncIterator[RequestOutput]:
    streams = [first]
    queue: asyncio.Queue = asyncio.Queue()
    pumps: list[asyncio.Task] = []
    try:
        out = await anext(first)  # choice 0's prompt is in the prefix cache from here
        yield out
        for index in range(1, n):
            try:
                streams.append(start(index))
            except NloraError as exc:
                raise RequestAborted(f"choice {index} of {n} could not be queued: {exc}") from exc
        pumps = [asyncio.create_task(_pump(index, stream, queue)) for index, stream in enumerate(streams)]
        running = n
        while running:
            out = await queue.get()
            if out is None:
                running -= 1
            elif isinstance(out, BaseException):
                raise out
            else:
                yield out
    finally:
        for pump in pumps:
            pump.cancel()
        for pump in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        for stream in streams:
            await stream.aclose()  # aborts every choice still running


async def _pump(index: int, stream: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
    """Put choice ``index``'s deltas on ``queue`` (tagged), then None; an error in their place."""
    try:
        async for out in stream:
            out.index = index
            queue.put_nowait(out)
        queue.put_nowait(None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # EngineError, RequestAborted: the merged stream raises it
        queue.put_nowait(exc)
