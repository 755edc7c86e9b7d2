"""vLLM's request outputs as the engine interface's: prompt log-probabilities, the adapter fields
every :class:`~nlora_serve.engine.api.RequestOutput` of a request carries, and the hand-over of
deltas from vLLM's loop to the caller's."""

from __future__ import annotations

import asyncio

from nlora_serve.adapters.registry import AdapterVersion
from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.prompt_logprobs import PromptLogprob


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
