"""The engine interface (DESIGN §5) the gRPC / HTTP front ends talk to, its request stream and
errors, and the prompt checks every backend shares.

Two engines implement :class:`Engine`: :class:`~nlora_serve.engine.llm_engine.LLMEngine` (ours) and
:class:`~nlora_serve.engine.vllm_backend.engine.VllmEngine` (vLLM's AsyncLLM, §8).
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from nlora_serve.adapters.runtime.version import AdapterVersion, Hold
from nlora_serve.errors import NloraError
from nlora_serve.engine.sample.prompt_logprobs import PromptLogprob
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.engine.structured_output.structured import StructuredOutputs


class EngineError(RuntimeError):
    """The engine failed while running a request (the message says what happened)."""


class EngineDead(NloraError):
    """A request refused because the engine can serve none any more (:attr:`Engine.dead_reason` is
    set) and the server is on its way out: front ends answer 503 / UNAVAILABLE, so a client
    retries on another replica."""


ENGINE_DEAD_MESSAGE = ("the engine died and this server is shutting down; retry on another replica "
                       "(the server's log has the cause)")
# what a request's client reads when the engine failed while running it (a step that raised, a vLLM
# error): the exception's own text may name another tenant's adapter (a failed step ends every
# request of its batch), memory figures or the server's paths, so it goes to the server's log only,
# as vLLM's "EngineCore encountered an issue. See stack trace (above) for the root cause."
ENGINE_FAILED_MESSAGE = "the engine failed while running this request (the server's log has the cause)"


class RequestAborted(NloraError):
    """The engine aborted a running request for a reason its client should see (a forced unload
    of its adapter, engine shutdown); the message says which. Never raised for an abort the
    consumer asked for itself (closing or cancelling its stream)."""


SHUTDOWN_REASON = "the engine shut down while this request ran; the request was aborted"


@dataclass(slots=True)
class RequestOutput:
    """One streamed delta of a request."""

    request_id: str
    text: str  # new text since the previous delta
    token_ids: list[int]  # new tokens since the previous delta
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error" at the end
    prompt_tokens: int  # usage: tokens in the prompt
    completion_tokens: int  # usage: tokens generated so far
    logprobs: list[dict[int, float]] | None = None  # per new token: {token id: log-probability}
    # what went wrong, with finish_reason "error"; with "abort", why the engine aborted the request
    # (a forced unload, shutdown), None when its own consumer went away
    error: str | None = None
    adapter: str | None = None  # adapter name the request runs on (None = base model)
    adapter_version: int = 0  # that adapter's version, pinned at admission (0 = base model)
    adapter_hash: str = ""  # that version's content hash ("" = base model)
    cached_tokens: int = 0  # usage: prompt tokens found in the prefix cache (OpenAI's cached_tokens)
    # vLLM's stop_reason, on the finished delta: the stop string or stop token id that ended the
    # request; None for EOS, length and every other end
    stop_reason: str | int | None = None
    # with SamplingParams.prompt_logprobs, on the delta of the first generated token (vLLM's
    # prompt_logprobs): per prompt token, None for the first, then its PromptLogprob
    # ({token id: log-probability}, the prompt token's own first, then its top prompt_logprobs; its rank)
    prompt_logprobs: list[PromptLogprob | None] | None = None
    # which of a request's n choices this delta belongs to: the HTTP front end runs each choice of
    # an ``n`` > 1 request as an engine request of its own and numbers them 0..n-1; else 0
    index: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestStream:
    """The async stream of one request's deltas, ending with a finished one.

    Closing it before the end aborts the request at once (its KV blocks and adapter pin are
    freed), also when it was never read: an async generator's ``aclose`` does nothing before its
    first ``__anext__``, which would leave such a request running to its end. A cancellation
    while waiting for a delta aborts it too.

    Raises (from ``__anext__``): EngineError when the engine failed while running the request;
    RequestAborted when the engine aborted it with a reason (the last delta's ``error``).
    """

    def __init__(self, request_id: str, deltas: asyncio.Queue, abort: Callable[[str], None],
                 engine_id: str | None = None) -> None:
        self.request_id = request_id  # the client's id
        self.engine_id = engine_id if engine_id is not None else request_id  # the engine's own (RequestIds)
        self._deltas = deltas
        self._abort = abort  # called with engine_id: stops the request and forgets its sink
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out: RequestOutput = await self._deltas.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            await self.aclose()
            raise
        if out.finished:
            self._done = True
        if out.finish_reason == "error":
            raise EngineError(f"request {self.request_id} failed: {out.error}")
        if out.finish_reason == "abort" and out.error is not None:
            raise RequestAborted(out.error)
        return out

    async def aclose(self) -> None:
        """Abort the request unless it already finished (idempotent)."""
        if not self._done:
            self._done = True
            self._abort(self.engine_id)


class RequestIds:
    """The engine's own request ids: every admitted request gets a fresh one, which keys its sink, its
    abort and its outputs inside the engine; the client's id is kept for logs, responses and abort
    by client id only. So a client may reuse an id at once after cancelling (the old request may
    still be running for a step) and neither request ever gets the other's output or abort (the
    class of vllm #23697 / #10583; vLLM's fix too). Thread-safe.
    """

    def __init__(self) -> None:
        self._next = itertools.count()
        self._client: dict[str, str] = {}  # engine id -> client id, while the request is open
        self._open: dict[str, set[str]] = {}  # client id -> its open engine ids
        self._lock = threading.Lock()

    def admit(self, client_id: str | None) -> tuple[str, str]:
        """(client id, engine id) of a new request; without ``client_id`` both are ``req-N``."""
        with self._lock:
            engine_id = f"req-{next(self._next)}"
            client_id = engine_id if client_id is None else client_id
            self._client[engine_id] = client_id
            self._open.setdefault(client_id, set()).add(engine_id)
        return client_id, engine_id

    def client(self, engine_id: str) -> str | None:
        """The client id of an open request, None once it was closed."""
        return self._client.get(engine_id)

    def engine_ids(self, client_id: str) -> list[str]:
        """The open requests a client id names (several while an old one ends after a cancel)."""
        with self._lock:
            return list(self._open.get(client_id, ()))

    def close(self, engine_id: str) -> None:
        """Forget a request (finished, or its consumer left); idempotent."""
        with self._lock:
            client_id = self._client.pop(engine_id, None)
            held = self._open.get(client_id)
            if held is not None:
                held.discard(engine_id)
                if not held:
                    del self._open[client_id]

    def __len__(self) -> int:
        return len(self._client)


class Engine(abc.ABC):
    """One base model serving many requests: submit, stream, abort, observe."""

    @abc.abstractmethod
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None, tenant: str | None = None,
                    cache_salt: str | None = None, add_special_tokens: bool = True,
                    held: Hold | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and return the async stream of its deltas, ending with a finished one.

        ``adapter`` names the adapter to run on (None = the base model); the version current now
        is pinned for the whole request and reported in every delta, or with ``held``, the
        caller's hold on a version of ``adapter`` (:meth:`AdapterManager.hold`), that version,
        superseded or not: the requests of one response all run on the version it held. Must be
        called from a running event loop. ``tenant`` names who sent it (the front ends pass the
        caller's key name; fair scheduling serves tenants, not requests, equally). ``cache_salt``:
        only requests with the same salt share prefix-cache blocks (None = the unsalted group).
        ``add_special_tokens``: a text prompt takes the tokenizer's special tokens (a BOS on
        Llama-style models), as vLLM's completions do by default; token ids run as given (see
        :func:`prompt_ids`). Closing the stream early (read or not) aborts the request: see
        :class:`RequestStream`.

        Raises:
            RequestError: invalid prompt or parameters, a prompt that leaves no room in
                max_model_len for one generated token, or min_tokens over the room it leaves
                (engine/request_checks.py's
                :func:`~nlora_serve.engine.request_checks.check_request` and
                :func:`~nlora_serve.engine.request_checks.fit_to_context`; at once, nothing queued,
                no KV block used). A max_tokens over the room left is lowered to it, as vLLM lowers it.
            AdapterNotFound: no adapter of that name (never the base model instead), or it was
                unloaded since ``held`` was taken.
            AdapterLoadFailed: an evicted adapter's files could not be read back. (A request whose
                LoRA finds no slot free waits for one: neither engine refuses it.)
            EngineError: from the stream, when the engine failed while running the request.
            RequestAborted: from the stream, when the engine aborted the request with a reason.
        """

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus generated tokens per request at most (tokens)."""

    @abc.abstractmethod
    def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """The token ids :meth:`add_request` would run for ``prompt`` with ``add_special_tokens``
        (safe from any thread).

        Raises:
            RequestError: see :func:`prompt_ids`.
        """

    @abc.abstractmethod
    def unload_adapter(self, name: str, force: bool = False) -> AdapterVersion:
        """Stop admitting requests for ``name``; in-flight ones finish, or with ``force`` abort, their
        streams raising RequestAborted that names the adapter version (:func:`unloaded_reason`)."""

    @abc.abstractmethod
    def abort(self, request_id: str, reason: str | None = None) -> None:
        """Stop the open requests with the client id ``request_id``; each stream ends with finish_reason
        "abort", or with ``reason`` raises RequestAborted(reason). Unknown ids are ignored."""

    @abc.abstractmethod
    def abort_all(self, reason: str) -> None:
        """Stop every request (queued ones too); each stream raises RequestAborted(reason). The
        server calls it when its drain period ends, so that no request is cut off unexplained."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """Gauges and counters (running, waiting, kv_blocks_used, kv_blocks_total, tokens, steps)."""

    def check_structured(self, spec: StructuredOutputs, tenant: str | None = None) -> None:
        """Compile a structured-output spec (engine/structured_output/structured.py) before its request queues, on
        the caller's thread; ``tenant`` (who sends it) compiles one spec at a time. This default
        refuses it: a backend that runs grammars overrides it.

        Raises:
            RequestError: the spec does not compile, ``tenant`` has another compiling, or this backend
                runs none (``param`` is ``spec.param``).
        """
        raise RequestError(f"{spec.param}: this engine backend does not run structured outputs "
                           "(the native engine does)", spec.param)

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        """Tenant name -> fair-scheduling weight (> 0; absent: 1) from now on, replacing the start's
        (``SchedulerConfig.tenant_weights``) after a tenants-file reload: requests submitted after
        this call are scheduled, and share the prefix cache and the LoRA slots, by them. This
        default has nothing to update: a backend that schedules first come first served."""

    def is_resident(self, version: AdapterVersion) -> bool:
        """Whether ``version``'s weights sit in the engine's adapter memory now (what
        ``nlora_adapters_resident`` and AdapterInfo.resident_bytes report): a pool slot here."""
        return version.slot is not None

    @property
    def dead_reason(self) -> str | None:
        """Why the engine can serve no request any more (None while it can). The server then turns
        health NOT_SERVING, aborts its requests without a drain and exits non-zero, so a supervisor
        restarts it (as vLLM's own server does on EngineDeadError). The native engine survives a
        failed step; it is dead only when its device is (a sticky CUDA error) or a step has run past
        ``--engine-step-timeout`` (engine/step_watchdog.py)."""
        return None


# Slack on the bytes-per-token bound below: a tokenizer's normaliser may compose characters (NFC:
# a letter and a combining accent become one), so the text it tokenizes can be shorter.
PROMPT_BYTES_SLACK = 4


def bytes_per_token(tokenizer) -> int:
    """The most UTF-8 bytes of text one token of ``tokenizer`` can spell: its longest vocabulary
    entry, in characters for byte-level BPE (each entry character stands for one byte: GPT-2's
    byte-to-unicode map), else in the entry's own UTF-8 bytes (SentencePiece's "▁" spells a 1-byte
    space, a "<0xE2>" fallback entry one byte, WordPiece's "##" nothing: never more)."""
    vocab = tokenizer.get_vocab()
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if "ByteLevel" in repr(decoder):
        return max((len(t) for t in vocab), default=1)
    return max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)


def max_prompt_bytes(tokenizer, max_model_len: int) -> int:
    """UTF-8 bytes beyond which a text prompt surely exceeds ``max_model_len`` tokens:
    :func:`bytes_per_token` times ``max_model_len`` times :data:`PROMPT_BYTES_SLACK`. Lets
    :func:`prompt_ids` refuse a huge prompt before tokenizing it: a 15 MB prompt took ~30 s of the
    front ends' one tokenizer thread. The bound is in bytes, not characters: at a bound in
    characters 663k emoji (2.6 MB) still took 1.9 s, where the bound in bytes lets through at most
    0.4 s of any text (measured with SmolLM2's tokenizer)."""
    return PROMPT_BYTES_SLACK * bytes_per_token(tokenizer) * max_model_len


def text_bytes(text: str) -> int:
    """UTF-8 length of ``text``, lone surrogates counted as 3 bytes (:func:`check_text` refuses them)."""
    return len(text.encode("utf-8", "surrogatepass"))


def prompt_ids(prompt: str | list[int], tokenizer, lock: threading.Lock, max_bytes: int | None = None,
               add_special_tokens: bool = True) -> list[int]:
    """A text prompt's token ids (``lock`` guards the tokenizer), or the given ids as a list.

    With ``add_special_tokens`` the tokenizer adds its special tokens as ``tokenizer(prompt)``
    does (a BOS on Llama 2/3 and Mistral, none on SmolLM2): vLLM's default for a completion's text
    (its CompletionRequest.add_special_tokens), and what transformers' generate is given. Chat
    prompts come here as ids, rendered by the chat template with its own BOS
    (serving/chat_template.py), so nothing adds a second one. Token ids are never changed.

    Raises:
        RequestError: text no tokenizer takes, text longer than ``max_bytes`` bytes of UTF-8 (see
            :func:`max_prompt_bytes`; refused without tokenizing), or ids that are not all integers.
    """
    if isinstance(prompt, str):
        check_prompt_text(prompt, max_bytes)
        with lock:
            return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    ids = list(prompt)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError("prompt must be a string or a list of integer token ids")
    return ids


def check_prompt_text(prompt: str, max_bytes: int | None) -> None:
    """Refuse a text prompt no tokenizer takes, or one longer than ``max_bytes`` bytes of UTF-8
    (:func:`max_prompt_bytes`; None: no bound), before it is tokenized.

    Raises:
        RequestError: either.
    """
    size = check_text(prompt)
    if max_bytes is not None and size > max_bytes:
        raise RequestError(f"prompt is {size:,} bytes of UTF-8: more tokens than the model's context holds "
                           f"(max_model_len; refused before tokenizing above {max_bytes:,} bytes)")


def check_text(prompt: str) -> int:
    """The text's UTF-8 length in bytes (one encoding pass serves the check and the bound).

    Raises:
        RequestError: text no tokenizer can take (a lone UTF-16 surrogate, e.g. "\\ud800").
    """
    try:
        return len(prompt.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise RequestError(f"prompt is not valid Unicode text: {exc.reason} at character {exc.start}") from exc
