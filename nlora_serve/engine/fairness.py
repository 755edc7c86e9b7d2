"""Fair scheduling across tenants: the Virtual Token Counter (VTC).

Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024 (Algorithm 2): every tenant
has a counter of the service it received, ``prompt_weight`` per prompt token computed plus
``output_weight`` per output token (the paper's w_p = 1, w_q = 2), divided by the tenant's weight.
Admission takes the tenant with the least counter among those waiting (its oldest request first:
FCFS inside a tenant, so no request of a tenant starves). A tenant that starts waiting again is
lifted to the least counter of those waiting (or, with nobody waiting, to the counter of the
tenant that left the queue last), so idling banks no credit.

Recomputation after a preemption and tokens found in the prefix cache are not billed: a tenant
pays for the tokens the server computed for it, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nlora_serve.engine.sequence import Sequence


class VirtualTokenCounter:
    """Per-tenant service counters and the VTC admission order.

    Args:
        weights: tenant -> weight (> 0; a tenant absent here weighs 1): a weight-2 tenant gets
            twice the service of a weight-1 tenant when both are backlogged.
        prompt_weight, output_weight: service per prompt / output token (VTC's w_p, w_q).
    """

    def __init__(self, weights: Mapping[str, float], prompt_weight: float = 1.0, output_weight: float = 2.0):
        self.weights = dict(weights)
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.counters: dict[str | None, float] = {}  # service received, weighted (VTC's c_u)
        self._waiting: dict[str | None, int] = {}  # waiting sequences per tenant
        self._last_left: str | None = None  # the tenant whose waiting requests ran out last

    def enqueue(self, seq: Sequence, new: bool) -> None:
        """``seq`` joins the waiting queue (``new``: a new request, else a preempted one)."""
        tenant = seq.tenant
        if new and tenant not in self._waiting:
            floor = min((self.counters.get(t, 0.0) for t in self._waiting),
                        default=self.counters.get(self._last_left, 0.0))
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._waiting[tenant] = self._waiting.get(tenant, 0) + 1

    def dequeue(self, seq: Sequence) -> None:
        """``seq`` left the waiting queue (admitted, finished or aborted while waiting)."""
        tenant = seq.tenant
        self._waiting[tenant] -= 1
        if self._waiting[tenant] == 0:
            del self._waiting[tenant]
            if not self._waiting:
                self._last_left = tenant

    def pick(self, waiting: Iterable[Sequence]) -> Sequence | None:
        """The oldest request of the waiting tenant with the least counter (``waiting`` in arrival
        order; ties go to the earlier arrival)."""
        best: Sequence | None = None
        best_counter = 0.0
        seen: set[str | None] = set()
        for seq in waiting:
            if seq.tenant in seen:
                continue
            seen.add(seq.tenant)
            counter = self.counters.get(seq.tenant, 0.0)
            if best is None or counter < best_counter:
                best, best_counter = seq, counter
        return best

    def charge(self, seq: Sequence, num_tokens: int) -> None:
        """Bill ``seq``'s tenant for computing its next ``num_tokens`` tokens (call before
        ``num_computed_tokens`` advances); tokens billed before (a recompute) are free."""
        start = max(seq.num_computed_tokens, seq.num_charged_tokens)
        end = seq.num_computed_tokens + num_tokens
        if end <= start:
            return
        prompt = max(0, min(end, seq.num_prompt_tokens) - start)
        service = self.prompt_weight * prompt + self.output_weight * (end - start - prompt)
        self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + service / self.weights.get(seq.tenant, 1.0)
        seq.num_charged_tokens = end
