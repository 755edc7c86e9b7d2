"""An admitted request into the engine and its metered stream back out (both front ends)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from nlora_serve.adapters.runtime.version import Hold
from nlora_serve.errors import NloraError
from nlora_serve.engine.api import Engine, EngineError, RequestAborted, RequestOutput
from nlora_serve.engine.request_checks import fit_to_context
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.serving.admission import Reservation
from nlora_serve.serving.auth import Principal
from nlora_serve.serving.metrics import RequestTimer


def start_request(engine: Engine, prompt: str | list[int], params: SamplingParams, engine_id: str | None,
                  adapter: str | None, principal: Principal | None = None,
                  cache_salt: str | None = None, held: Hold | None = None) -> AsyncIterator[RequestOutput]:
    """Queue an admitted request (its :class:`~nlora_serve.serving.admission.Reservation` taken) in the engine, for ``principal``'s
    tenant (``cache_salt``: see :func:`~nlora_serve.serving.request_policy.cache_salt_of`), on
    ``adapter``'s current version or on the version of ``held``, the caller's hold (:meth:`Engine.add_request`).

    max_tokens is lowered to the rest of the context (max_model_len - prompt tokens), as vLLM
    0.32's ``get_max_tokens`` lowers it: ``params.max_tokens`` is the request's or, when it sets
    none, its default (the server's ``--max-tokens``, see
    :func:`~nlora_serve.serving.request_policy.max_tokens_of`); either way a request that reaches
    the context's end finishes with "length". The caller must hand the returned stream and the
    reservation to :class:`Metered`, which releases the reservation; if this raises, the caller releases it.

    Raises:
        RequestError: a prompt that leaves no room to generate, min_tokens over the room left
            (:func:`~nlora_serve.engine.request_checks.fit_to_context`), or from :meth:`Engine.add_request`.
            AdapterNotFound: from :meth:`Engine.add_request` (nothing is queued then).
    """
    prompt = engine.prompt_ids(prompt)
    params = fit_to_context(len(prompt), params, engine.max_model_len)
    tenant = principal.name if principal is not None else None
    return engine.add_request(prompt, params, request_id=engine_id, adapter=adapter, tenant=tenant,
                              cache_salt=cache_salt, held=held)


class Metered:
    """The engine stream's deltas, timed into ``timer`` (``timer.duration`` is set before the last
    finished delta is returned: ``n`` choices finish one each, see
    :func:`~nlora_serve.serving.http_api.choices.start_choices`). However it ends (finished, closed
    early, read or not, cancelled), the engine stream is closed, which aborts an unfinished request
    and frees its KV blocks and adapter pin at once, ``reservation`` is released, and the request's
    end is counted for its tenant (:meth:`RequestTimer.ended`: "finished" once every choice has,
    "aborted" when the engine aborted one, "error", or "cancelled" before its end), and logged with
    ``--enable-log-requests`` (request_log.py). A class, not an async generator: a generator's
    ``aclose`` runs nothing before its first ``__anext__``, which kept the request running and its
    reservation held for good (engine/api.py's RequestStream).

    Raises (from ``__anext__``):
        EngineError: the engine failed while running the request. RequestAborted: the engine
            aborted it for a reason its client should see.
    """

    def __init__(self, stream: AsyncIterator[RequestOutput], timer: RequestTimer, reservation: Reservation,
                 n: int = 1) -> None:
        self._stream, self._timer, self._reservation = stream, timer, reservation
        self._unfinished = n  # choices not finished yet
        self._prefilled: set[int] = set()  # choices whose prompt tokens are counted
        self._outcome = "cancelled"  # closed or cancelled before its last choice finished (client gone, deadline)
        self._aborted = False  # a choice ended with finish_reason "abort"
        self._closed = False

    def __aiter__(self) -> Metered:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        try:
            out = await anext(self._stream)
        except BaseException as exc:  # its end (StopAsyncIteration), an error, a cancellation
            if isinstance(exc, RequestAborted):
                self._outcome = "aborted"
            elif isinstance(exc, EngineError):
                self._outcome = "error"
            if isinstance(exc, (RequestAborted, EngineError)) and self._timer.record is not None:
                self._timer.record.reason = str(exc)
            await self.aclose()
            raise
        timer = self._timer
        timer.tokens(len(out.token_ids))
        if timer.record is not None:  # serve --enable-log-requests
            timer.record.seen(out)
        if out.index not in self._prefilled and (out.token_ids or out.finished):
            self._prefilled.add(out.index)  # counted at its first token, as vLLM's, not at its end
            timer.prefilled(out.prompt_tokens, out.cached_tokens)
        self._aborted = self._aborted or out.finish_reason == "abort"  # by the engine, with no reason to raise
        if out.finished:
            self._unfinished -= 1
            if not self._unfinished:
                timer.finish()
                self._outcome = "aborted" if self._aborted else "finished"
        return out

    async def aclose(self) -> None:
        """Close the engine stream, count the request's end and release the reservation (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stream.aclose()
        finally:
            self._timer.ended(self._outcome)  # first: who waits for the admission count to drop then reads it counted
            self._reservation.release()


def adapter_versions(engine: Engine) -> list | None:
    """The engine's current adapter versions, or None when it serves no adapters (no store)."""
    try:
        return engine.adapters.versions()
    except NloraError:  # ``engine.adapters`` raises without an adapter store
        return None
