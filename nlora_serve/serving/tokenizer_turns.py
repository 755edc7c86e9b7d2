"""The front ends' one tokenizer thread, their grammar threads, and tenants' turns on each (both front ends)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# Prompt tokenization and chat rendering run here, off the event loop: a 16 MiB prompt takes ~30 s
# to tokenize, and on the loop it froze every stream and request of every tenant meanwhile. One
# thread, as vLLM's OpenAI server has (serving_engine's _tokenizer_executor): tokenizers are never
# used concurrently, and a huge prompt costs at most one core.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nlora-tokenize")
# Structured-output specs are compiled (engine/structured_output/grammar_compiler.py) from threads of their own: a caller
# waits up to 5 s for a compile slot and 5 s for its compile, and on the tokenizer thread that wait
# held every other tenant's prompts back (a tenant sending slow specs doubled their TTFT). A tenant
# has at most one job here at a time (its turn), so these threads are the tenants compiling at once.
GRAMMAR_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nlora-grammar")


class TokenizerTurns:
    """Takes each tenant's prompt tokenization to the front ends' one tokenizer thread one at a
    time, so the thread's queue holds at most one job per tenant and tenants' jobs take turns
    (``executor``: the threads, by default the tokenizer's; GRAMMAR_THREADS for spec compiles).

    Without turns, one tenant's 16 concurrent 663k-emoji prompts (1.9 s each, all refused in the
    end) queued ahead of everyone and another tenant's "Hi" waited 20-47 s (round-four hostile
    review). Now it waits behind at most one job of each other tenant, and a job is at most
    :func:`~nlora_serve.engine.api.max_prompt_bytes` of text (~0.4 s). Only requests holding a
    :class:`~nlora_serve.serving.admission.Reservation` come here, so a tenant's waiters (and the bodies they hold) are bounded by
    its quota and queue share. Event-loop only.
    """

    def __init__(self, executor: ThreadPoolExecutor = _TOKENIZER_THREAD) -> None:
        self._executor = executor
        self._turns: dict[str | None, asyncio.Lock] = {}
        self._users: dict[str | None, int] = {}  # callers holding or awaiting a tenant's turn

    async def run(self, tenant: str | None, fn: Callable, *args):
        """``fn(*args)`` on the tokenizer thread in ``tenant``'s turn, awaited; its exception, if
        any, is raised here."""
        turn = self._turns.setdefault(tenant, asyncio.Lock())
        self._users[tenant] = self._users.get(tenant, 0) + 1
        try:
            async with turn:
                job = self._executor.submit(fn, *args)
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
