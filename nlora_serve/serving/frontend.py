"""What the gRPC and HTTP front ends share: admission, chat rendering, the max_tokens policy and
the metered engine stream (DESIGN §6).

Both front ends admit a request the same way (key; draining, the bounded queue and the tenant's
quota, reserved in :class:`Admission` before the prompt is tokenized, by HTTP before the body is
read, by gRPC after the grant and parameters of its message; the prompt; then the engine), count
it in the same :class:`Admission` (``--max-queue`` bounds gRPC and HTTP requests together) and
stream it through :func:`metered`, so metrics and cancellation behave the same whichever protocol
a tenant speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from nlora_serve.errors import NloraError, shown
from nlora_serve.engine.api import Engine, text_bytes
from nlora_serve.engine.request_checks import check_context
from nlora_serve.engine.api import RequestOutput
from nlora_serve.serving.auth import Authenticator, Principal
from nlora_serve.serving.chat_template import encode_chat
from nlora_serve.serving.grpc_status import Draining, QueueFull
from nlora_serve.serving.metrics import RequestTimer
from nlora_serve.engine.sampling import RequestError, SamplingParams
from nlora_serve.serving.server_config import ServerConfig

CHAT_ROLES = ("system", "user", "assistant")
# characters of a request's cache_salt: an identifier (vLLM suggests one per end user, or a random
# secret: 43 characters of base64 hold 256 bits), not a payload. Unbounded, a 15 MB salt was
# carried into the engine and hashed on its step thread, slowing every tenant's steps.
MAX_CACHE_SALT = 1024

# Prompt tokenization and chat rendering run here, off the event loop: a 16 MiB prompt takes ~30 s
# to tokenize, and on the loop it froze every stream and request of every tenant meanwhile. One
# thread, as vLLM's OpenAI server has (serving_engine's _tokenizer_executor): tokenizers are never
# used concurrently, and a huge prompt costs at most one core.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlora-tokenize")


class TokenizerTurns:
    """Takes each tenant's prompt tokenization to the front ends' one tokenizer thread one at a
    time, so the thread's queue holds at most one job per tenant and tenants' jobs take turns.

    Without turns, one tenant's 16 concurrent 663k-emoji prompts (1.9 s each, all refused in the
    end) queued ahead of everyone and another tenant's "Hi" waited 20-47 s (round-four hostile
    review). Now it waits behind at most one job of each other tenant, and a job is at most
    :func:`~nlora_serve.engine.api.max_prompt_bytes` of text (~0.4 s). Only requests holding a
    :class:`Reservation` come here, so a tenant's waiters (and the bodies they hold) are bounded by
    its quota and queue share. Event-loop only.
    """

    def __init__(self) -> None:
        self._turns: dict[str | None, asyncio.Lock] = {}
        self._users: dict[str | None, int] = {}  # callers holding or awaiting a tenant's turn

    async def run(self, tenant: str | None, fn: Callable, *args):
        """``fn(*args)`` on the tokenizer thread in ``tenant``'s turn, awaited; its exception, if
        any, is raised here."""
        turn = self._turns.setdefault(tenant, asyncio.Lock())
        self._users[tenant] = self._users.get(tenant, 0) + 1
        try:
            async with turn:
                job = _TOKENIZER_THREAD.submit(fn, *args)
                try:
                    return await asyncio.wrap_future(job)
                except asyncio.CancelledError:
                    # the caller is gone; a job already running on the thread keeps the turn until it
                    # ends, or the tenant's next job would queue beside it (two ahead of the others)
                    if not job.cancel():
                        await asyncio.wait([asyncio.wrap_future(job)])
                    raise
        finally:
            self._users[tenant] -= 1
            if not self._users[tenant]:  # nobody waits: forget the tenant's lock
                del self._users[tenant], self._turns[tenant]


class Reservation:
    """One request's place in its :class:`Admission` counts, taken before its prompt is tokenized
    (:meth:`Admission.reserve`) and given back exactly once, whichever way the request ends: refused
    after reserving (a bad prompt, an unknown adapter, a context overflow), its client gone while it
    waited for the tokenizer, or its engine stream ended (:func:`metered`). Event-loop only."""

    __slots__ = ("admission", "tenant", "held")

    def __init__(self, admission: Admission, tenant: str | None):
        self.admission, self.tenant, self.held = admission, tenant, True
        admission.enter(tenant)

    def release(self) -> None:
        """Leave the admission counts; a second call does nothing."""
        if self.held:
            self.held = False
            self.admission.leave(self.tenant)


class Admission:
    """Counts admitted requests (running + waiting, both front ends) against ``max_queue``, in
    all and per tenant. A request counts from its :meth:`reserve`, before its prompt is tokenized
    (a 660 KB prompt takes ~0.45 s of the one tokenizer thread), so the queue bound and a tenant's
    quota refuse it before that work (HTTP: before its body is read).

    With ``tenant_shares`` (fair scheduling) a tenant may hold at most ``weight x (free places)``
    of the queue (at least one): the dynamic threshold of Choudhury and Hahne ("Dynamic queue
    length thresholds for shared-memory packet switches", IEEE/ACM ToN 1998), so one tenant never
    fills the queue before the fair scheduler sees the others: alone it gets half of it, and a
    newcomer always finds room. A tenant's ``max_concurrent_requests`` bounds it in any case.
    Only touched from the server's event loop, so plain integers suffice.
    """

    def __init__(self, max_queue: int, tenant_shares: bool = False):
        self.max_queue = max_queue
        self.tenant_shares = tenant_shares
        self.tokenizer = TokenizerTurns()  # the stage before admission: prompts to token ids
        self.inflight = 0
        self.held: dict[str, int] = {}  # requests running or waiting per tenant name
        self.draining = False
        self.drain_started = asyncio.Event()  # set by start_draining(): bodies still unread give up
        self.idle = asyncio.Event()
        self.idle.set()

    def start_draining(self) -> None:
        """Refuse new requests from now on (Draining), and wake the ones whose HTTP body has not
        arrived, so that a body held back cannot hold up a shutdown."""
        self.draining = True
        self.drain_started.set()

    def check(self, principal: Principal | None = None) -> None:
        """Raises Draining or QueueFull when a new request (of ``principal``) may not start now."""
        if self.draining:
            raise Draining("server is shutting down; retry on another replica")
        # refusals name the caller's own count only: the server's total is other tenants' traffic
        if self.inflight >= self.max_queue:
            raise QueueFull(f"server queue is full (--max-queue {self.max_queue} requests running or waiting); "
                            f"retry with backoff")
        if principal is None:
            return
        held, limit = self.held.get(principal.name, 0), principal.max_concurrent_requests
        if limit is not None and held >= limit:
            raise QueueFull(f"{principal.name!r} has {held} requests running or waiting, its "
                            f"max_concurrent_requests in the tenants file; retry when one ends")
        share = principal.weight * (self.max_queue - self.inflight)
        if self.tenant_shares and held >= max(1.0, share):
            raise QueueFull(f"{principal.name!r} holds {held} requests running or waiting, its share of the "
                            f"queue's free places now (--max-queue {self.max_queue}, weight {principal.weight:g}); "
                            f"retry with backoff")

    def reserve(self, principal: Principal | None = None) -> Reservation:
        """:meth:`check`, then count the request (of ``principal``'s tenant) until the returned
        reservation is released.

        Raises:
            Draining, QueueFull: from :meth:`check` (nothing is counted then).
        """
        self.check(principal)
        return Reservation(self, principal.name if principal is not None else None)

    def enter(self, tenant: str | None = None) -> None:
        self.inflight += 1
        if tenant is not None:
            self.held[tenant] = self.held.get(tenant, 0) + 1
        self.idle.clear()

    def leave(self, tenant: str | None = None) -> None:
        self.inflight -= 1
        if tenant is not None:
            self.held[tenant] -= 1
            if self.held[tenant] == 0:
                del self.held[tenant]
        if self.inflight == 0:
            self.idle.set()


def cache_salt_of(principal: Principal, requested: str | None, auth: Authenticator) -> str | None:
    """The engine's prefix-cache salt of a request: requests share KV blocks only under equal salts.

    With keys configured the salt is the pair (tenant name, the caller's ``cache_salt`` or none):
    a ``cache_salt`` chooses a sharing group within the caller's tenant (e.g. one per end user, as
    vLLM's field is meant), never across tenants, so no tenant can probe another's prompts by
    sending its salt (cached tokens and TTFT would tell). JSON makes the pair unambiguous for any
    name and salt. Without keys (auth off, one anonymous caller) vLLM's behaviour: the caller's
    salt, or None (one group).
    """
    if not auth.enabled:
        return f"salt:{requested}" if requested else None
    return "tenant:" + json.dumps([principal.name, requested or None])


def check_cache_salt(salt: str | None, field: str) -> None:
    """Refuse a ``cache_salt`` over :data:`MAX_CACHE_SALT` characters (``field`` names it).

    Raises:
        RequestError: the salt is too long.
    """
    if salt is not None and len(salt) > MAX_CACHE_SALT:
        raise RequestError(f"{field} must be at most {MAX_CACHE_SALT} characters; got {len(salt)} "
                           "(a salt names a sharing group, e.g. an end user's id or a random token)")


def render_chat(messages: list[dict[str, str]], tokenizer, field: str, max_bytes: int | None = None,
                max_messages: int | None = None) -> list[int]:
    """Token ids of chat ``messages`` ({"role", "content"}) under the model's chat template, with the
    assistant's generation prompt appended; content text is tokenized as text, never as special
    tokens (:func:`~nlora_serve.serving.chat_template.encode_chat`). ``max_bytes``: contents longer
    than this in all (UTF-8) surely exceed the context (:func:`~nlora_serve.engine.api.max_prompt_bytes`);
    ``max_messages``: so do more messages (max_model_len: each renders at least its turn marker).

    Raises:
        RequestError: no messages, a role not in :data:`CHAT_ROLES`, contents over ``max_bytes``
            bytes or over ``max_messages`` messages (refused before the template renders them:
            a 15 MB message, or 300k empty ones, held the front ends' one tokenizer thread, so every
            tenant's requests, for 6-30 s), or from :func:`encode_chat` (the message names ``field``).
    """
    if not messages:
        raise RequestError(f"{field} has no messages")
    for i, message in enumerate(messages):
        if message["role"] not in CHAT_ROLES:
            role = shown(str(message['role']))
            raise RequestError(f"{field}[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}")
    if max_messages is not None and len(messages) > max_messages:
        raise RequestError(f"{field} holds {len(messages):,} messages: more turns than the model's context holds "
                           f"tokens (max_model_len {max_messages}; refused before rendering)")
    size = sum(text_bytes(message["content"]) for message in messages)
    if max_bytes is not None and size > max_bytes:
        raise RequestError(f"{field} hold {size:,} bytes of content (UTF-8): more tokens than the model's context "
                           f"holds (max_model_len; refused before tokenizing above {max_bytes:,} bytes)")
    return encode_chat(messages, tokenizer, field)


def max_tokens_of(requested: int | None, config: ServerConfig, field: str) -> int:
    """The request's max_tokens: ``requested``, or when unset (None or 0) the server's
    ``--max-tokens``, which :func:`start_request` lowers to the rest of the context.

    Raises:
        RequestError: more than the server's ``--max-tokens`` (the message names ``field``).
    """
    max_tokens = requested or config.max_tokens
    if max_tokens > config.max_tokens:
        raise RequestError(f"{field} must be <= the server's --max-tokens {config.max_tokens}; "
                           f"got {_digits(max_tokens)}")
    return max_tokens


def check_min_tokens_unset_max(min_tokens: int, config: ServerConfig, field: str) -> None:
    """With max_tokens unset, min_tokens in [0, the server's ``--max-tokens``] (the most max_tokens
    can then be), refused in words that name no max_tokens the client never sent.

    Raises:
        RequestError: ``min_tokens`` outside that range (the message names ``field``).
    """
    if not 0 <= min_tokens <= config.max_tokens:
        raise RequestError(f"{field} must be an integer in [0, {config.max_tokens}]; got {_digits(min_tokens)} "
                           f"(max_tokens is unset: it defaults to the rest of the context, capped at the "
                           f"server's --max-tokens {config.max_tokens})", param="min_tokens")


def _digits(number: int) -> str:
    """``number`` as an error quotes it: a hostile 400-digit number is not echoed whole."""
    text = str(number)
    return text if len(text) <= 20 else f"{text[:8]}... ({len(text)} digits)"


def start_request(engine: Engine, prompt: str | list[int], params: SamplingParams, engine_id: str | None,
                  adapter: str | None, max_tokens_given: bool, principal: Principal | None = None,
                  cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
    """Queue an admitted request (its :class:`Reservation` taken) in the engine, for ``principal``'s
    tenant (``cache_salt``: see :func:`cache_salt_of`).

    Without ``max_tokens_given``, max_tokens is the rest of the context (max_model_len - prompt
    tokens, as vLLM), at most ``params.max_tokens`` (the server's ``--max-tokens``, see
    :func:`max_tokens_of`). The caller must hand the returned stream and the reservation to
    :func:`metered`, which releases the reservation; if this raises, the caller releases it.

    Raises:
        RequestError: a prompt that leaves no room to generate, min_tokens over the room left, or
            from :meth:`Engine.add_request` (with a prompt plus max_tokens over max_model_len).
            AdapterNotFound, PoolFull: from :meth:`Engine.add_request` (nothing is queued then).
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
                              cache_salt=cache_salt)


async def metered(stream: AsyncIterator[RequestOutput], timer: RequestTimer,
                  reservation: Reservation) -> AsyncIterator[RequestOutput]:
    """The engine stream's deltas, timed into ``timer`` (``timer.duration`` is set before the finished
    delta is yielded). However this generator ends (finished, closed early, cancelled), the engine
    stream is closed, which aborts an unfinished request and frees its KV blocks and adapter pin at
    once, and ``reservation`` is released.

    Raises:
        EngineError: the engine failed while running the request.
    """
    try:
        async with contextlib.aclosing(stream):
            async for out in stream:
                timer.tokens(len(out.token_ids))
                if out.finished:
                    timer.finish(out.prompt_tokens, out.cached_tokens)
                yield out
    finally:
        reservation.release()


def adapter_versions(engine: Engine) -> list | None:
    """The engine's current adapter versions, or None when it serves no adapters (no store)."""
    try:
        return engine.adapters.versions()
    except NloraError:  # ``engine.adapters`` raises without an adapter store
        return None
