"""The engine core: requests in, one step at a time, output deltas out.

No threads here; :class:`nlora_serve.engine.llm_engine.LLMEngine` drives it from its step thread.
With async scheduling a step's tokens are read back during the next call, after the next step is
launched (:meth:`EngineCore.step`), so the device never waits for the host's detokenizing.
Every terminal path (finish reasons "stop", "length", "abort", "error") goes through
:meth:`EngineCore._retire`, the one place that frees a request's KV blocks.

Beside it: request_state.py (what is kept per request, the deltas made from it), runner_setup.py
(the model runner built at start-up), scheduler.py, step_output.py (sampling and the read-back).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.models import BaseModel, load_base
from nlora_serve.engine.model.adapter_layer import AdapterHook
from nlora_serve.engine.request_checks import check_request, fit_to_context, unloaded_reason
from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.config import EngineConfig
from nlora_serve.engine.eos import eos_tokens
from nlora_serve.engine.scheduling.prefix_cache import PrefixCachingBlockManager
from nlora_serve.engine.sample.prompt_logprobs import mark_scored, plan
from nlora_serve.engine.request_state import (RequestState, broken_grammar, new_request, nonfinite_error,
                                              request_output)
from nlora_serve.engine.runner.runner_setup import build_runner
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.engine.scheduling.scheduler import ScheduledBatch, Scheduler
from nlora_serve.engine.scheduling.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nlora_serve.engine.sample.step_output import SampledStep, sample_step
from nlora_serve.engine.structured_output.grammar_compiler import GrammarCompiler
from nlora_serve.engine.structured_output.structured import StructuredOutputs
from nlora_serve.engine.threads import on_device
from nlora_serve.engine.sample.token_masks import bad_words_token_ids, check_a_first_token
from nlora_serve.engine.runner.warmup import warm_up

log = logging.getLogger(__name__)


class EngineCore:
    """Scheduler + model runner + sampler + detokenizers for one base model.

    It runs on the engine's step thread (engine/step_thread.py); :meth:`validate` and
    :meth:`check_structured` are safe from any thread too.

    Raises (constructor):
        ModelError: the model cannot be loaded. ValueError: the config does not fit the model.
    """

    def __init__(self, config: EngineConfig, base: BaseModel | None = None) -> None:
        with on_device(torch.device(config.device)):  # the kernels of start-up on the engine's GPU
            self._build(config, base)

    def _build(self, config: EngineConfig, base: BaseModel | None) -> None:
        device = torch.device(config.device)
        if base is None:
            base = load_base(config.model, config.dtype, config.cache_dir, config.load_format, config.tokenizer,
                             init_device=device)
        if base.dtype != config.dtype:
            raise ValueError(f"base model is {base.dtype}, EngineConfig.dtype is {config.dtype}")
        self.config = config
        self.device = device
        self.vocab_size = base.spec.vocab_size
        self.tokenizer = base.tokenizer()
        # the tokenizer's EOS and the generation config's eos_token_id, as vLLM's (engine/eos.py)
        self.eos = eos_tokens(base.path, config.generation_config, self.tokenizer.eos_token_id, self.vocab_size)
        self.eos_ids = set(self.eos.all)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)  # structured outputs
        self.tokenizer_path = base.tokenizer_path
        self.runner, native, num_blocks = build_runner(config, base, device)
        self.reset_scheduling(num_blocks)
        # with fair scheduling, contending tenants share the LoRA slots too (adapters/runtime/residency.py)
        sched = config.scheduler
        shares = sched.tenant_weights if sched.policy == "fair" else None
        self.adapters = AdapterManager(base, config.adapter_dir, config.adapter_limits, placement=self.runner.placement(),
                                       tenant_shares=shares) if config.adapter_dir else None
        self.hook = AdapterHook(native, triton=config.kernel_backend == "triton")
        if self.adapters is not None:
            self.runner.set_adapter_hook(self.hook)
        self.requests: dict[str, RequestState] = {}
        self.warmup = warm_up(self) if device.type == "cuda" else None  # kernels compiled before serving

    def reset_scheduling(self, num_blocks: int | None = None) -> None:
        """A fresh block manager (empty prefix cache), scheduler, seed generator and counters, on an
        idle engine: at start, and after the warm-up's dummy requests (engine/runner/warmup.py)."""
        config = self.config
        num_blocks = num_blocks if num_blocks is not None else self.blocks.num_blocks
        if config.enable_prefix_caching:  # with "fair", tenants share the cache by weight too
            weights = config.scheduler.tenant_weights if config.scheduler.policy == "fair" else None
            self.blocks = PrefixCachingBlockManager(num_blocks, config.cache.block_size, tenant_weights=weights)
        else:
            self.blocks = BlockManager(num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)
        self._arrivals = 0
        self.counters = {"steps": 0, "prompt_tokens": 0, "generation_tokens": 0, "computed_tokens": 0,
                         "preemptions": 0}
        self.runner.reset_counts()
        self._inflight: SampledStep | None = None  # the launched step whose tokens are not read back yet
        # why the device can run nothing more (a sticky CUDA error found after a failed step); None: fine
        self.device_error: str | None = None

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        """Under "fair", tenant -> weight (> 0; absent: 1) from the next step on, after a
        tenants-file reload: the scheduler's shares and service, the prefix cache's shares, and
        what :meth:`reset_scheduling` starts from (the LoRA slots': ``adapters.residency``). A
        tenant's service counted so far stays; one no longer named weighs 1. Nothing under "fcfs".
        The weights are the tenants file's, checked by its loader (tenants_file.py): runs on the step thread,
        where a failure would end every request.
        """
        if self.config.scheduler.policy != "fair":
            return
        self.config.scheduler.tenant_weights = dict(weights)
        self.scheduler.fair.weights = dict(weights)
        if isinstance(self.blocks, PrefixCachingBlockManager) and self.blocks.shares is not None:
            self.blocks.shares.set_weights(weights)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Check a request without touching engine state (safe from any thread): see
        :func:`check_request`; a structured-output spec is compiled here (cached), on the caller's
        thread, so that a bad one is refused before it queues.

        Raises:
            RequestError: from :func:`check_request`, :func:`fit_to_context` (no room left, or
                min_tokens over it), :func:`check_a_first_token` (masks that leave no first token) or
                :meth:`GrammarCompiler.compile`.
        """
        check_request(prompt_ids, self.vocab_size, self.config.scheduler.max_model_len,
                      params.stop_token_ids, params.logit_bias, params.allowed_token_ids, params.logprob_token_ids)
        # its refusals only (no room left, min_tokens over the room); add() lowers max_tokens with it
        fit_to_context(len(prompt_ids), params, self.config.scheduler.max_model_len)
        check_a_first_token(params.allowed_token_ids, bad_words_token_ids(self.tokenizer, params.bad_words),
                            params.min_tokens, self.eos.banned_before_min_tokens(params.stop_token_ids))
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    def check_structured(self, spec: StructuredOutputs, tenant: str | None = None) -> None:
        """Compile ``spec`` into the cache and onto the spec (any thread); raises RequestError as
        :meth:`validate`, or ``tenant`` has another spec compiling."""
        self.grammars.compile(spec, tenant)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter=None,
            tenant: str | None = None, cache_salt: str | None = None) -> None:
        """Queue a request. ``adapter`` is its pinned AdapterVersion (None = base model); from
        here on the engine releases it exactly once, when the request ends. ``tenant``: who sent
        it (fair scheduling); ``cache_salt``: its prefix-cache sharing group (see :class:`Sequence`).

        Raises:
            RequestError: a duplicate id, or see :meth:`validate` (the caller still owns the pin).
        """
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already running")
        self.validate(prompt_ids, params)
        # a max_tokens over the context left is lowered to it (vLLM's get_max_tokens), never refused
        params = fit_to_context(len(prompt_ids), params, self.config.scheduler.max_model_len)
        req = new_request(request_id, self._arrivals, prompt_ids, params, adapter, tenant, cache_salt,
                          device=self.device, tokenizer=self.tokenizer, eos=self.eos, grammars=self.grammars)
        self._arrivals += 1
        self.counters["prompt_tokens"] += len(prompt_ids)
        self.requests[request_id] = req
        self.scheduler.add(req.seq)

    def has_work(self) -> bool:
        """True while requests wait or run, or a launched step's tokens are not yet read back."""
        return self.scheduler.has_work() or self._inflight is not None

    def abort(self, request_id: str, reason: str | None = None) -> RequestOutput | None:
        """Stop a request now and free its blocks; None if it is unknown or already done.
        ``reason`` (why the engine aborts it) goes into the last delta's ``error``."""
        req = self.requests.get(request_id)
        return None if req is None else self._retire(req, "abort", "", [], reason)

    def abort_adapter(self, name: str) -> list[RequestOutput]:
        """Abort every request running on any version of adapter ``name`` (a forced unload); each
        last delta says which version was unloaded (:func:`unloaded_reason`)."""
        held = [r for r in self.requests.values() if r.seq.adapter is not None and r.seq.adapter.name == name]
        return [self._retire(r, "abort", "", [], unloaded_reason(r.seq.adapter)) for r in held]

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with finish_reason "error" and ``message`` as its error (after a failed
        step); returns their last deltas. The step in flight is dropped unread and, on CUDA, waited
        for (:meth:`_wait_device`)."""
        outs = [self._retire(req, "error", "", [], message) for req in list(self.requests.values())]
        self._inflight = None
        self._wait_device()
        return outs

    def _wait_device(self) -> None:
        """On CUDA, wait for every launched step: after a failed one nothing in flight is read back,
        the only sign that the copies out of the staging buffers (step_inputs.py) have run. A wait
        that raises is a sticky CUDA error (an illegal address, an ECC fault): the context can run
        nothing more, so :attr:`device_error` says why and the engine reports itself dead."""
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError as exc:  # every later step would raise it again
                log.exception("waiting for the device after a failed step")
                self.device_error = f"the device failed ({str(exc).splitlines()[0][:200]})"

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read back the tokens of the step before it; returns a
        delta for every sequence whose token was read back.

        With ``async_scheduling`` the host schedules and launches step n+1 while the device may
        still run step n (step n+1's input ids gather step n's tokens on the device), and only then
        waits for step n's tokens to stop, detokenize and emit (vLLM's async scheduling, SGLang's
        overlap scheduler). A sequence that stopped at step n had step n+1 launched already: that
        step's token is discarded and its computed count rolled back (:meth:`_retire`). Without it,
        each step's tokens are read back in the same call. Either way, one device sync per step.
        """
        outputs = []
        if self._inflight is not None and self._inflight.needs_values:  # penalties read the token values
            outputs += self._settle(self._take_inflight())
        batch = self.scheduler.schedule()
        self.counters["preemptions"] += len(batch.preempted)
        previous = self._inflight
        self._inflight = self._launch(batch, previous) if batch.seqs else None
        if previous is not None:
            outputs += self._settle(previous)
        if self._inflight is not None:
            self._add_placeholders(self._inflight)
            if not self.config.async_scheduling:
                outputs += self._settle(self._take_inflight())
        return outputs

    def _take_inflight(self) -> SampledStep:
        step, self._inflight = self._inflight, None
        return step

    def _launch(self, batch: ScheduledBatch, previous: SampledStep | None) -> SampledStep:
        """Run the model on ``batch`` and sample on the device; nothing is read back here.
        ``previous``: the step still in flight (async scheduling), whose sampled tokens, still on
        the device, are this step's input ids where its placeholders stand (engine/runner/step_inputs.py)."""
        pairs = self.runner.order(batch)
        prompt = plan(pairs)  # prompt positions to score (prompt_logprobs requests' prefill chunks)
        self.hook.begin_step([seq.adapter for seq, _ in pairs], [n for _, n in pairs], self.device)
        try:
            if prompt is None:
                logits, scored = self.runner.execute(pairs, previous), []
            else:
                logits, scored = self.runner.execute_scored(pairs, previous, prompt)
        finally:
            self.hook.end_step()
        if prompt is not None:
            mark_scored(prompt)
        # a sequence samples when this step computes up to its last token (not a prefill chunk before it)
        sampling = [seq for seq, n in pairs if seq.num_computed_tokens + n == seq.num_tokens]
        for seq, n in pairs:
            seq.num_computed_tokens += n
        self.counters["steps"] += 1
        self.counters["computed_tokens"] += batch.total_tokens
        bans = [self.requests[s.request_id].ban for s in sampling]
        return sample_step(logits, pairs, sampling, bans, self.generator, prompt, scored)

    @staticmethod
    def _add_placeholders(step: SampledStep) -> None:
        """Stand a placeholder for each live sampling sequence's token until it is read back, so the
        scheduler sees the token (its length and blocks) before its value is known."""
        for seq in step.seqs:
            if seq.status is not SequenceStatus.FINISHED:
                seq.token_ids.append(PLACEHOLDER)

    def _settle(self, step: SampledStep) -> list[RequestOutput]:
        """Read ``step``'s tokens back and return their deltas (first those of rows whose logits were
        not finite: their requests end with an error); a row whose sequence ended since the step was
        launched is dropped."""
        tokens, finite, logprobs = step.read()
        for seq, entries in step.read_prompt():  # before the tokens: the first one hands them out
            req = self.requests.get(seq.request_id)
            if seq.status is not SequenceStatus.FINISHED and req is not None and req.prompt_logprobs is not None:
                req.prompt_logprobs += entries
        outs, bad = [], []
        for seq, token, ok, lp in zip(step.seqs, tokens, finite, logprobs):
            if seq.status is SequenceStatus.FINISHED:  # stopped or aborted after this step was launched
                continue
            if not ok:
                bad.append(seq)
                continue
            seq.token_ids[-1] = token  # the placeholder (the step after has placed none yet)
            self.counters["generation_tokens"] += 1
            outs.append(self._emit_token(self.requests[seq.request_id], token, lp))
        return self._fail_nonfinite(bad) + outs

    def _fail_nonfinite(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """End ``seqs``, whose logits were not finite this step, with finish_reason "error"."""
        outs = []
        for seq in seqs:
            outs.append(self._retire(self.requests[seq.request_id], "error", "", [], nonfinite_error(seq)))
        return outs

    def _emit_token(self, req: RequestState, token: int, logprobs) -> RequestOutput:
        """The delta of ``token``, already in ``req.seq.token_ids``: its grammar, stop token, stop
        string and length checks, its text, and the request's end (:meth:`_retire`) when one ends it."""
        seq, params = req.seq, req.seq.params
        reason = "stop" if token in req.stops else None
        if seq.matcher is not None:
            if not seq.matcher.accept_token(token):  # the mask allowed nothing (a dead end), or a bug
                return self._retire(req, "error", "", [], broken_grammar(seq, token, self.vocab_size))
            if seq.matcher.is_terminated():  # it accepted a stop token where the output may end
                reason = "stop"
        # a stop token's text is left out (vLLM's rule) unless include_stop_str_in_output
        text = req.detokenizer.add(token) if reason is None or params.include_stop_str_in_output else ""
        if req.detokenizer.stopped:
            reason = "stop"
        # add() lowered max_tokens to the context left, so this also ends a request at max_model_len
        elif reason is None and seq.num_output_tokens >= params.max_tokens:
            reason = "length"
        if reason is None:
            return request_output(req, text, [token], None, logprobs)
        out = self._retire(req, reason, text, [token], logprobs=logprobs)
        if reason == "stop" and req.detokenizer.stopped:
            out.stop_reason = req.detokenizer.stop_string
        elif reason == "stop" and token in req.stops:  # not a grammar's end
            out.stop_reason = self.eos.stop_reason(token, params.ignore_eos)  # None for the EOS (vLLM's check_stop)
        return out

    def _retire(self, req: RequestState, reason: str, text: str, token_ids: list[int], error: str | None = None,
                logprobs=None) -> RequestOutput:
        """The single terminal path: frees the blocks, releases the adapter pin, forgets the request,
        returns the last delta. A step in flight that computed for it is undone on the host (its
        token will be dropped), so the computed count, and the prefix cache's blocks, are those of a
        step-by-step engine.

        Args:
            reason: the finish reason: "stop", "length", "abort" or "error".
            text, token_ids: the last delta's text and tokens ("" and [] when no token ends it);
                on "stop" and "length" the detokenizer's held-back text is added to ``text``.
            error: why the engine ended it (the delta's ``error``), None for a normal end.
            logprobs: the last token's log-probabilities, as :meth:`SampledStep.read` gives them.
        """
        seq = req.seq
        if self._inflight is not None:
            seq.num_computed_tokens -= self._inflight.computed.get(id(seq), 0)
        while seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
            seq.token_ids.pop()
        self.scheduler.finish(seq)
        self.runner.release(seq)
        del self.requests[seq.request_id]
        pinned, seq.adapter = seq.adapter, None
        if pinned is not None:
            self.adapters.release(pinned, seq.tenant)
        flush_stopped = False
        if reason in ("stop", "length"):
            stopped = req.detokenizer.stopped
            text += req.detokenizer.flush()
            # the flush's text (held back by the window path, never a dangling partial character)
            # completed a stop string: the text is cut there, so the request stopped on it, not on its length
            flush_stopped = reason == "length" and req.detokenizer.stopped and not stopped
        out = request_output(req, text, token_ids, "stop" if flush_stopped else reason, logprobs, pinned)
        if flush_stopped:
            out.stop_reason = req.detokenizer.stop_string
        out.error = error
        return out

    def stats(self) -> dict[str, int]:
        """Counters (since the last :meth:`reset_scheduling`) and gauges: running / waiting requests,
        KV blocks used / total, prefix-cache queries and hits (tokens), prompt / generation /
        computed tokens, steps, preemptions, and the runner's graph / piecewise / eager steps."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.blocks.num_used_blocks, "kv_blocks_total": self.blocks.num_blocks,
                "prefix_cache_queries": getattr(self.blocks, "num_queries", 0),
                "prefix_cache_hits": getattr(self.blocks, "num_hits", 0),
                **self.counters, **self.runner.step_counts}
