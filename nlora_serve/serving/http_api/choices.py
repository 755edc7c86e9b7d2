"""OpenAI's ``n`` and a batch of prompts: the choices of one request, each an engine request of its
own, as one stream.

vLLM V1 runs ``n`` > 1 the same way (v1/engine/parallel_sampling.py: a parent request fans out
into ``n`` child requests with ``n = 1``), and its rule for seeds is kept: with a ``seed`` choice
``j`` samples with ``seed + j`` (so it is the answer a one-choice request with that seed gets),
without one every choice draws from the engine's shared generator. A /v1/completions batch of P
prompts is P such parents with the same params, as vLLM 0.32's completion serving runs it: choice
``j`` of prompt ``i`` has index ``i * n + j`` and seed ``seed + j`` (the same for every prompt).
Each prompt's choice 0 is queued at once (the prompts prefill together) and its other choices once
its first delta arrives: its prompt's full KV blocks are computed and committed to the native
engine's prefix cache by then, so the other choices read the prompt from the cache instead of each
prefilling it again (queued at once, all would be admitted in one step, before any block was
committed). A hot swap in between must not run one response's choices on two versions under one
``X-Adapter-Version`` and ``system_fingerprint``, nor abort the response: as vLLM and LoRAX serve
all ``n`` choices on one adapter, the caller holds the adapter version current before the first
choice is queued (AdapterManager.hold) and queues every choice on it, superseded or not (its
weights stay resident while held); :func:`start_choices` lets it go once every choice is queued
(each pins the version itself until it ends) or the request ends first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

from nlora_serve.engine.api import RequestAborted, RequestOutput
from nlora_serve.engine.sample.sampling import GREEDY_BELOW, RequestError, SamplingParams
from nlora_serve.errors import NloraError
from nlora_serve.serving.http_api.request_models import ChatRequest, CompletionRequest, ParamError
from nlora_serve.serving.request_policy import shown_int
from nlora_serve.serving.server_config import ServerConfig

Start = Callable[[int], AsyncIterator[RequestOutput]]  # choice index -> its engine stream, queued now


def check_choices(request: CompletionRequest | ChatRequest, params: SamplingParams, config: ServerConfig,
                  num_prompts: int = 1) -> None:
    """``n`` and ``best_of`` as vLLM 0.32 takes them (its SamplingParams checks and V1's
    ParentRequest), bounded by the queue: each choice of each of ``num_prompts`` prompts is a
    request running or waiting.

    Raises:
        ParamError: n below 1 or over ``--max-queue``; prompts x n over ``--max-queue`` (param
            ``prompt``); n > 1 with greedy sampling (vLLM's rule: the choices would be identical);
            best_of other than null or n; seed + n - 1 past the seed's range (choice j samples with
            seed + j).
    """
    n = request.num_choices
    if n < 1:
        raise ParamError(f"n must be at least 1; got {shown_int(n)}", "n")
    if n > config.max_queue:
        raise ParamError(f"n must be at most the server's --max-queue {config.max_queue} (each choice is a request "
                         f"running or waiting); got {shown_int(n)}", "n")
    check_places(num_prompts, n, config.max_queue)
    if request.best_of is not None and request.best_of != n:
        raise ParamError(f"best_of={shown_int(request.best_of)} is not supported: only null or best_of = n ({n}); "
                         "vLLM 0.32 ignores best_of, this server refuses what it would ignore", "best_of")
    if n > 1 and params.temperature < GREEDY_BELOW:
        raise ParamError(f"n must be 1 when using greedy sampling (temperature 0), got {n} (vLLM's rule: the "
                         "choices would be identical)", "n")
    if params.seed is not None and params.seed + n - 1 >= 1 << 64:
        raise ParamError(f"seed + n - 1 must be below 2^64: choice i samples with seed + i (vLLM's rule); got seed "
                         f"{params.seed} with n {n}", "seed")


def check_places(num_prompts: int, n: int, max_queue: int) -> None:
    """Refuse ``num_prompts`` prompts x ``n`` choices over ``max_queue`` (--max-queue) requests.

    Raises:
        ParamError: param ``prompt``.
    """
    if num_prompts * n > max_queue:
        raise ParamError(f"prompt holds {num_prompts} prompts x n={n} choices = {num_prompts * n} requests: more than "
                         f"the server's --max-queue {max_queue} (each is a request running or waiting)", "prompt")


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling params of choice ``index``: ``seed + index`` when seeded (vLLM's rule)."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


async def start_choices(start: Start, n: int, num_prompts: int = 1,
                        let_go: Callable[[], None] | None = None) -> AsyncIterator[RequestOutput]:
    """Queue each prompt's choice 0 now and return the deltas of all ``num_prompts x n`` choices,
    each tagged with its ``index`` (prompt ``i``'s choice ``j``: ``i * n + j``), in the order they
    come; the stream ends once every choice has finished. Closing it (or an error in one choice)
    aborts every unfinished choice at once. ``let_go`` (ends the caller's hold on the adapter
    version ``start`` queues every choice on) is called exactly once: when every choice is queued,
    or when this raises or the stream ends first.

    Raises:
        RequestError, AdapterNotFound: from ``start(i * n)``, now (the prompts queued
            before it are aborted; a batch's message names the prompt). (From the stream:)
            EngineError, RequestAborted: a choice failed or was aborted; a choice that could not be
            queued (its adapter unloaded meanwhile) is RequestAborted.
    """
    let_go = _once(let_go)
    firsts: list[AsyncIterator[RequestOutput]] = []
    for i in range(num_prompts):
        try:
            firsts.append(start(i * n))
        except BaseException as exc:
            for stream in firsts:
                await stream.aclose()
            let_go()
            if isinstance(exc, NloraError):
                raise of_prompt(exc, i, num_prompts) from None
            raise
    if n == 1:  # every choice is queued
        let_go()
    return firsts[0] if n * num_prompts == 1 else _Merged(firsts, start, n, let_go)


def _once(let_go: Callable[[], None] | None) -> Callable[[], None]:
    """``let_go`` as a callable that runs it the first time only (none: does nothing)."""
    pending = [let_go] if let_go is not None else []

    def call() -> None:
        if pending:
            pending.pop()()

    return call


def of_prompt(exc: NloraError, index: int, num_prompts: int) -> NloraError:
    """``exc`` of prompt ``index`` of a batch: a RequestError's message names the prompt (as
    ``prompt[index]: ...``, or in place of the engine's own "prompt": ``prompt[1] is empty: ...``,
    not ``prompt[1]: prompt is empty: ...``), and so does its param unless it names another field
    (a context overflow names none); any other error, or the one prompt's, is ``exc`` itself."""
    if num_prompts == 1 or not isinstance(exc, RequestError):
        return exc
    message = str(exc)
    if message.startswith("prompt "):  # the engine's words name the one prompt it was given
        return RequestError(f"prompt[{index}]{message.removeprefix('prompt')}", exc.param or "prompt")
    return RequestError(f"prompt[{index}]: {message}", exc.param or "prompt")


class _Merged:
    """The deltas of ``firsts`` (each prompt's choice 0, queued) and of the other choices, queued
    through ``start`` at their prompt's first delta, as :func:`start_choices` returns them. Closing
    it, read or not (a class, not an async generator, whose ``aclose`` runs nothing before its
    first ``__anext__``: the hold was kept and the choices ran on), lets the hold go and aborts
    every choice still running, as its end or an error does."""

    def __init__(self, firsts: list[AsyncIterator[RequestOutput]], start: Start, n: int,
                 let_go: Callable[[], None]) -> None:
        self._streams, self._start, self._n, self._let_go = list(firsts), start, n, let_go
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps = [asyncio.create_task(_pump(i * n, stream, self._queue)) for i, stream in enumerate(firsts)]
        self._waiting = [n > 1] * len(firsts)  # per prompt: its other choices are not queued yet
        self._running = n * len(firsts)  # choices not finished
        self._closed = False

    def __aiter__(self) -> _Merged:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._next()
        except BaseException:  # the end (StopAsyncIteration), a choice's error, a cancellation
            await self.aclose()
            raise

    async def _next(self) -> RequestOutput:
        n = self._n
        while self._running:
            out = await self._queue.get()
            if out is None:
                self._running -= 1
                continue
            if isinstance(out, BaseException):
                raise out
            prompt = out.index // n
            if self._waiting[prompt]:  # its choice 0's first delta: the prompt is in the prefix cache from here
                self._waiting[prompt] = False
                for index in range(prompt * n + 1, prompt * n + n):
                    try:
                        self._streams.append(self._start(index))
                    except NloraError as exc:
                        raise RequestAborted(f"choice {index} of {n * len(self._waiting)} could not be queued: "
                                             f"{exc}") from exc
                    self._pumps.append(asyncio.create_task(_pump(index, self._streams[-1], self._queue)))
                if not any(self._waiting):
                    self._let_go()
            return out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Let the hold go and abort every choice still running (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._let_go()
        for pump in self._pumps:
            pump.cancel()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        for stream in self._streams:
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
