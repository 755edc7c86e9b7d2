"""An admitted request into the engine and its metered stream back out (both front ends)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from nlora_serve.adapters.version import Hold
from nlora_serve.errors import NloraError
from nlora_serve.engine.api import Engine, EngineError, RequestAborted, RequestOutput
from nlora_serve.engine.request_checks import check_context
from nlora_serve.engine.sampling import RequestError, SamplingParams
from nlora_serve.serving.admission import Reservation
from nlora_serve.serving.auth import Principal
from nlora_serve.serving.metrics import RequestTimer


def start_request(engine: Engine, prompt: str | list[int], params: SamplingParams, engine_id: str | None,
                  adapter: str | None, max_tokens_given: bool, principal: Principal | None = None,
                  cache_salt: str | None = None, held: Hold | None = None) -> AsyncIterator[RequestOutput]:
    """Queue an admitted request (its :class:`~nlora_serve.serving.admission.Reservation` taken) in the engine, for ``principal``'s
    tenant (``cache_salt``: see :func:`~nlora_serve.serving.request_policy.cache_salt_of`), on
    ``adapter``'s current version or on the version of ``held``, the caller's hold (:meth:`Engine.add_request`).

    Without ``max_tokens_given``, max_tokens is the rest of the context (max_model_len - prompt
    tokens, as vLLM), at most ``params.max_tokens`` (the server's ``--max-tokens``, see
    :func:`~nlora_serve.serving.request_policy.max_tokens_of`). The caller must hand the returned stream and the reservation to
    :func:`metered`, which releases the reservation; if this raises, the caller releases it.

    Raises:
        RequestError: a prompt that leaves no room to generate, min_tokens over the room left, or
            from :meth:`Engine.add_request` (with a prompt plus max_tokens over max_model_len).
            AdapterNotFound: from :meth:`Engine.add_request` (nothing is queued then).
    """
    if not max_tokens_given:
        prompt = engine.prompt_ids(prompt)
        check_context(len(prompt), None, engine.max_model_len)
        room = engine.max_model_len - len(prompt)
        if params.min_tokens > room:  # else SamplingParams would name a max_tokens never sent
            raise RequestError(f"min_tokens {params.min_tokens} is more than the {room} tokens of context left "
                               f"(max_model_len {engine.max_model_len}, prompt {len(prompt)} tokens)", param="min_tokens")
        params = dataclasses.replace(params, max_tokens=min(room, params.max_tokens))
    tenant = principal.name if principal is not None else None
    return engine.add_request(prompt, params, request_id=engine_id, adapter=adapter, tenant=tenant,
                              cache_salt=cache_salt, held=held)


async def metered(stream: AsyncIterator[RequestOutput], timer: RequestTimer,
                  reservation: Reservation, n: int = 1) -> AsyncIterator[RequestOutput]:
    """The engine stream's deltas, timed into ``timer`` (``timer.duration`` is set before the last
    finished delta is yielded: ``n`` choices finish one each, see
    :func:`~nlora_serve.serving.http_api.choices.start_choices`). However this generator ends
    (finished, closed early, cancelled), the engine stream is closed, which aborts an unfinished
    request and frees its KV blocks and adapter pin at once, ``reservation`` is released, and the
    request's end is counted for its tenant (:meth:`RequestTimer.ended`: "finished" once every
    choice has, "aborted" when the engine aborted one, "error", or "cancelled" before its end).

    Raises:
        EngineError: the engine failed while running the request. RequestAborted: the engine
            aborted it for a reason its client should see.
    """
    unfinished = n
    prefilled: set[int] = set()  # choices whose prompt tokens are counted
    outcome = "cancelled"  # closed or cancelled before its last choice finished (client gone, deadline)
    aborted = False  # a choice ended with finish_reason "abort"
    try:
        async with contextlib.aclosing(stream):
            async for out in stream:
                timer.tokens(len(out.token_ids))
                if out.index not in prefilled and (out.token_ids or out.finished):
                    prefilled.add(out.index)  # counted at its first token, as vLLM's, not at its end
                    timer.prefilled(out.prompt_tokens, out.cached_tokens)
                aborted = aborted or out.finish_reason == "abort"  # by the engine, with no reason to raise
                if out.finished:
                    unfinished -= 1
                    if not unfinished:
                        timer.finish()
                        outcome = "aborted" if aborted else "finished"
                yield out
    except RequestAborted:
        outcome = "aborted"
        raise
    except EngineError:
        outcome = "error"
        raise
    finally:
        timer.ended(outcome)  # first: who waits for the admission count to drop then reads it counted
        reservation.release()


def adapter_versions(engine: Engine) -> list | None:
    """The engine's current adapter versions, or None when it serves no adapters (no store)."""
    try:
        return engine.adapters.versions()
    except NloraError:  # ``engine.adapters`` raises without an adapter store
        return None
