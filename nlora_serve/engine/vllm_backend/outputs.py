"""vLLM's request outputs as the engine interface's: a request's bookkeeping (:class:`Job`), its
deltas, prompt log-probabilities, the adapter fields every
:class:`~nlora_serve.engine.api.RequestOutput` of a request carries, and the hand-over of deltas
from vLLM's loop to the caller's."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nlora_serve.adapters.runtime.version import AdapterVersion
from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.sample.prompt_logprobs import PromptLogprob
from nlora_serve.engine.vllm_backend.config import FINISH


@dataclass(slots=True)
class Job:
    """One request's bookkeeping (every field guarded by the engine's lock)."""

    rid: str  # the engine's own id (RequestIds), also vLLM's request id
    client_id: str  # the caller's id, in every RequestOutput
    prompt_tokens: int
    pinned: AdapterVersion | None  # the adapter version it runs on, released exactly once
    sink: object  # delivers a RequestOutput to the caller's loop
    future: object = None  # concurrent.futures.Future of its task on the vLLM loop
    started: bool = False  # its task runs (abort cancels it) rather than waits to start (abort ends it here)
    ended: bool = False  # its terminal path ran
    abort_reason: str | None = None  # why the engine aborts it (forced unload, shutdown); None: its consumer left
    tenant: str | None = None  # whose request it is (its pin is counted for it: AdapterManager.requests_of)


def delta_of(out, job: Job, made: int, scored: list[PromptLogprob | None] | None) -> RequestOutput:
    """vLLM's RequestOutput ``out`` (its one choice) as ours: ``made`` tokens generated so far,
    this delta's included; ``scored`` the prompt's log-probabilities in our shape (None: none)."""
    done = out.outputs[0]
    reason = FINISH.get(done.finish_reason, "error") if out.finished else None
    logprobs = [{t: lp.logprob for t, lp in step.items()} for step in done.logprobs] if done.logprobs else None
    error = f"vLLM ended it with finish reason {done.finish_reason!r}" if reason == "error" else None
    return RequestOutput(job.client_id, done.text, list(done.token_ids), reason, job.prompt_tokens, made, logprobs,
                         error, **adapter_fields(job.pinned), cached_tokens=out.num_cached_tokens or 0,
                         stop_reason=done.stop_reason if reason == "stop" else None, prompt_logprobs=scored or None)


def final_delta(job: Job, reason: str, made: int, error: str | None = None, cached: int = 0) -> RequestOutput:
    """The last delta of a request vLLM did not end itself (aborted, failed): no new tokens."""
    return RequestOutput(job.client_id, "", [], reason, job.prompt_tokens, made, error=error,
                         **adapter_fields(job.pinned), cached_tokens=cached)


def prompt_logprobs_of(ids: list[int], scored: list) -> list[PromptLogprob | None]:
    """vLLM's ``prompt_logprobs`` (per prompt token None or ``{token id: Logprob}``) as ours: the
    prompt token's log-probability first, then the others; its rank."""
    out: list[PromptLogprob | None] = []
    for token, entry in zip(ids, scored):
        if entry is None:
            out.append(None)
            continue
        mine = entry[token]
        logprobs = {token: mine.logprob}
        logprobs.update((t, lp.logprob) for t, lp in entry.items() if t != token)
        out.append(PromptLogprob(logprobs, mine.rank))
    return out


def adapter_fields(pinned: AdapterVersion | None) -> dict:
    """The adapter fields of every RequestOutput of a request."""
    return dict(adapter=pinned.name if pinned else None, adapter_version=pinned.version if pinned else 0,
                adapter_hash=pinned.content_hash if pinned else "")


def threadsafe_sink(loop: asyncio.AbstractEventLoop, deltas: asyncio.Queue):
    """Hands a delta to the caller's loop; drops it when that loop is closed (nobody listens)."""
    def put(out: RequestOutput) -> None:
        try:
            loop.call_soon_threadsafe(deltas.put_nowait, out)
        except RuntimeError:
            pass
    return put
