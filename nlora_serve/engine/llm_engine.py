"""Our engine behind the :class:`~nlora_serve.engine.api.Engine` interface (DESIGN §5).

:class:`LLMEngine` is the callers' side: it checks and tokenizes requests, pins their adapters and
hands them to its :class:`~nlora_serve.engine.step_thread.StepThread`, which steps the core in its
own thread and hands deltas to asyncio through ``loop.call_soon_threadsafe``; the vLLM-backed engine
(§8) implements the same interface in vllm_backend/engine.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

from transformers import AutoTokenizer

from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.runtime.version import AdapterVersion, Hold
from nlora_serve.adapters.runtime.residency import SlotBusy
from nlora_serve.errors import AdapterError
from nlora_serve.models import BaseModel
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.api import (ENGINE_DEAD_MESSAGE, Engine, EngineDead, EngineError, RequestIds,
                                   RequestStream, RequestOutput, max_prompt_bytes, prompt_ids)
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.inbox import Abort, AbortAdapter, AddRequest, SetWeights, WarmUp
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.step_thread import HUNG_POLL_SECONDS, Sink, StepThread
from nlora_serve.engine.structured_output.structured import StructuredOutputs
from nlora_serve.engine.threads import engine_threads
from nlora_serve.engine.runner.warmup import WarmupReport, adapter_kinds


class LLMEngine(Engine):
    """The native engine: :class:`EngineCore` stepped by one background thread, :attr:`step_thread`
    (engine/step_thread.py: its inbox, the requests' sinks, the LoRA slot waiters, the watchdog)."""

    def __init__(self, config: EngineConfig, base: BaseModel | None = None) -> None:
        self.core = EngineCore(config, base)
        # callers tokenize with their own instance: the step thread detokenizes with the core's
        self.tokenizer = AutoTokenizer.from_pretrained(self.core.tokenizer_path)
        self._ids = RequestIds()
        self._lock = threading.Lock()  # guards tokenizer use from caller threads
        self._max_prompt_bytes: int | None = None  # set on the first prompt (api.max_prompt_bytes)
        # started last: start-up above is not timed by its watchdog
        self.step_thread = StepThread(self.core, self._ids, engine_threads(config.cpu_threads))

    # -- submission ----------------------------------------------------------------------------

    @property
    def adapters(self) -> AdapterManager:
        """Adapter admin (register, swap, list). Raises AdapterError when no store is configured."""
        if self.core.adapters is None:
            raise AdapterError("this engine serves no adapters: start it with an adapter store (--adapter-dir)")
        return self.core.adapters

    @property
    def max_model_len(self) -> int:
        return self.core.config.scheduler.max_model_len

    @property
    def dead_reason(self) -> str | None:
        """See :attr:`Engine.dead_reason`. A failed step ends its requests and the engine serves on,
        unless the device itself failed (a sticky CUDA error: :attr:`EngineCore.device_error`), after
        which every step would fail while health said serving, or a step has run past
        ``EngineConfig.step_timeout_s`` (hung: engine/step_watchdog.py, read here, on the caller's
        thread, not the stuck one's); then the server aborts its requests, without a drain, and exits 1."""
        return self.core.device_error or self.step_thread.watchdog.reason()

    def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if self._max_prompt_bytes is None:  # once: a pass over the vocabulary
            self._max_prompt_bytes = max_prompt_bytes(self.tokenizer, self.max_model_len)
        return prompt_ids(prompt, self.tokenizer, self._lock, self._max_prompt_bytes, add_special_tokens)

    def check_structured(self, spec: StructuredOutputs, tenant: str | None = None) -> None:
        """Compile a structured-output spec into the engine's cache and onto the spec, on the
        caller's thread (the front ends run it on a thread of their own, off the event loop and the
        tokenizer thread); ``tenant`` compiles one spec at a time.

        Raises:
            RequestError: the spec does not compile, or ``tenant`` has another compiling; ``param``
                is ``spec.param``.
        """
        self.core.check_structured(spec, tenant)

    def unload_adapter(self, name: str, force: bool = False) -> AdapterVersion:
        version = self.adapters.unload(name, force)
        if force:
            self.step_thread.send(AbortAdapter(name))
        return version

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        # the LoRA slots' shares at once (residency has its lock: requests take slots on callers'
        # threads); the scheduler's and the prefix cache's between steps, before any request
        # submitted after this call is added
        if self.core.adapters is not None:
            self.core.adapters.set_tenant_shares(weights)
        self.step_thread.send(SetWeights(dict(weights)))

    def _submit(self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None,
                sink: Sink, adapter: str | None = None, tenant: str | None = None,
                cache_salt: str | None = None, add_special_tokens: bool = True,
                held: Hold | None = None) -> tuple[str, str]:
        """Queue a request; returns its (client id, engine id)."""
        if self.step_thread.stopping:
            raise EngineError("engine is shut down")
        if self.dead_reason is not None:
            raise EngineDead(ENGINE_DEAD_MESSAGE)
        params = params if params is not None else SamplingParams()
        ids = self.prompt_ids(prompt, add_special_tokens)
        self.core.validate(ids, params)
        pinned, placed = self._pin(adapter, tenant, held) if adapter is not None else (None, True)
        client_id, engine_id = self._ids.admit(request_id)
        self.step_thread.add(AddRequest(engine_id, ids, params, pinned, tenant, cache_salt, placed), sink)
        return client_id, engine_id

    def _pin(self, adapter: str, tenant: str | None, held: Hold | None) -> tuple[AdapterVersion, bool]:
        """Reserve ``adapter`` for a request and place it now, unless requests already wait for a
        LoRA slot (they go first) or none is free: (the version, whether it is placed).

        Raises:
            AdapterNotFound, AdapterLoadFailed: as AdapterManager.acquire (nothing stays pinned).
        """
        pinned = self.adapters.reserve(adapter, tenant, held)
        if len(self.step_thread.waiters):
            return pinned, False
        try:
            self.adapters.place(pinned, tenant)
        except SlotBusy:  # a slot frees when a request on one ends: it waits (engine/slot_wait.py)
            return pinned, False
        except BaseException:
            self.adapters.unreserve(pinned, tenant)
            raise
        return pinned, True

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None, tenant: str | None = None,
                    cache_salt: str | None = None, add_special_tokens: bool = True,
                    held: Hold | None = None) -> RequestStream:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        client_id, engine_id = self._submit(prompt, params, request_id,
                                            lambda out: loop.call_soon_threadsafe(deltas.put_nowait, out), adapter,
                                            tenant, cache_salt, add_special_tokens, held)
        return RequestStream(client_id, deltas, self.step_thread.drop, engine_id)

    def abort(self, request_id: str, reason: str | None = None) -> None:
        for engine_id in self._ids.engine_ids(request_id):
            self.step_thread.send(Abort(engine_id, reason))

    def abort_all(self, reason: str) -> None:
        self.step_thread.abort_all(reason)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion (blocking); one merged output per prompt, in order.
        ``adapters`` gives each prompt's adapter name (None = base model). A text prompt takes the
        tokenizer's special tokens, as :meth:`add_request`'s default and vLLM's ``LLM.generate``.

        Each result holds the whole text and token ids, the finish reason and usage.

        Raises:
            RequestError: a prompt or parameter set is invalid. EngineError: a step failed.
            EngineDead: the engine is dead (:attr:`dead_reason`) before the prompts were queued, or
                its step hung past ``EngineConfig.step_timeout_s`` while they ran.
        """
        plist = params if isinstance(params, list) else [params] * len(prompts)
        done = threading.Event()
        results: dict[str, list[RequestOutput]] = {}
        remaining = [len(prompts)]

        def collect(out: RequestOutput) -> None:
            results.setdefault(out.request_id, []).append(out)
            if out.finished:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        if not prompts:
            return []
        names = adapters if adapters is not None else [None] * len(prompts)
        rids = [self._submit(p, sp, None, collect, a)[0] for p, sp, a in zip(prompts, plist, names)]
        while not done.wait(HUNG_POLL_SECONDS):  # in slices: a hung step thread never sets it
            if self.step_thread.watchdog.stuck():
                raise EngineDead(f"{ENGINE_DEAD_MESSAGE}: {self.step_thread.watchdog.reason()}")
        merged = [_merge(results[rid]) for rid in rids]
        failed = next((m for m in merged if m.finish_reason == "error"), None)
        if failed is not None:
            raise EngineError(f"request {failed.request_id} failed: {failed.error}")
        return merged

    def warm_up(self, adapters: tuple[str, ...] | None = None) -> WarmupReport | None:
        """Run the start-up warm-up (engine/runner/warmup.py) again on adapters, so their kernels compile
        and their graphs are captured before the first request on them (the constructor's warm-up
        ran before any adapter was registered). ``adapters``: the names to run on; None: on CUDA,
        one served adapter of each kind (LoRA, NLoRA, tied IntTune, family member), and nothing
        elsewhere. Blocks until done; returns None when there was nothing to run.

        Raises:
            RuntimeError: requests are running or waiting (call it at start, after registering).
            AdapterNotFound: a name given is not registered.
        """
        if adapters is None and self.core.device.type == "cuda" and self.core.adapters is not None:
            adapters = adapter_kinds(self.core.adapters.versions())
        if not adapters:
            return None
        names = tuple(adapters)
        done, result = threading.Event(), []
        self.step_thread.send(WarmUp(names, done, result))
        done.wait()
        if isinstance(result[0], Exception):
            raise result[0]
        return result[0]

    def stats(self) -> dict[str, int]:
        stats = self.core.stats()
        stats["waiting"] += len(self.step_thread.waiters)  # those waiting for a LoRA slot are queued too
        return stats

    def shutdown(self) -> None:
        """Stop the step thread; requests still running end with finish_reason "abort" and
        :data:`SHUTDOWN_REASON` (their streams raise RequestAborted)."""
        self.step_thread.stop()  # not for ever behind a hung step: the thread is a daemon, left behind

    def step_thread_alive(self, wait_s: float = 0.0) -> bool:
        """Whether the step thread still runs after waiting up to ``wait_s`` seconds for it to end.
        After :meth:`shutdown`, only where a step hung: the thread is a daemon, left in its step, and
        the process must not wait for it (serve exits with ``os._exit``: commands/exit_now.py)."""
        return self.step_thread.alive(wait_s)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _merge(deltas: list[RequestOutput]) -> RequestOutput:
    last = deltas[-1]
    logprobs = [lp for d in deltas for lp in (d.logprobs or [])] or None
    return RequestOutput(last.request_id, "".join(d.text for d in deltas),
                         [t for d in deltas for t in d.token_ids], last.finish_reason,
                         last.prompt_tokens, last.completion_tokens, logprobs, last.error,
                         last.adapter, last.adapter_version, last.adapter_hash, cached_tokens=last.cached_tokens,
                         stop_reason=last.stop_reason,
                         prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), None))
