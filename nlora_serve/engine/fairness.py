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

VTC orders admission only. With every running slot taken (``max_num_seqs`` binding), a light
tenant first in line still waits for a heavy tenant's decode to finish, and those waits grow with
the step time. So slots are shared too (:meth:`VirtualTokenCounter.rebalance`): each active tenant
(running or waiting) has a share of ``max_num_seqs · w / Σw`` slots; a waiting tenant whose recent
slot usage (decayed mean of slots held per step) is below its share takes a slot from the tenant
furthest above its own, by preempting that tenant's newest sequence (it recomputes later, from the
prefix cache where one is on), and admission prefers tenants below their share, so the slot is
not handed straight back. Recent usage rather than what is waiting now: a light tenant's Poisson
bursts briefly ask for more than its share without it being heavy. Only a tenant clearly above
its share gives (by half a slot, a hysteresis), and never so that the taker ends up holding more
than the giver: under a load where no tenant is heavy, ``fair`` preempts nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from nlora_serve.engine.sequence import Sequence


class VirtualTokenCounter:
    """Per-tenant service counters, the VTC admission order and slot sharing.

    Args:
        weights: tenant -> weight (> 0; a tenant absent here weighs 1): a weight-2 tenant gets
            twice the service of a weight-1 tenant when both are backlogged.
        prompt_weight, output_weight: service per prompt / output token (VTC's w_p, w_q).
        usage_half_life: steps over which a tenant's recent slot usage halves its weight on the
            past. Long enough that a light tenant's Poisson burst (a few requests of ~33 steps)
            averages out: at 64 the nine-light-tenant load of issue 20 still preempted.
    """

    HYSTERESIS_SLOTS = 0.5  # how far above its share a donor's recent usage must be (rebalance)

    def __init__(self, weights: Mapping[str, float], prompt_weight: float = 1.0, output_weight: float = 2.0,
                 usage_half_life: float = 128.0):
        self.weights = dict(weights)
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.counters: dict[str | None, float] = {}  # service received, weighted (VTC's c_u)
        self._waiting: dict[str | None, int] = {}  # waiting sequences per tenant
        self._last_left: str | None = None  # the tenant whose waiting requests ran out last
        self.slot_usage: dict[str | None, float] = {}  # running slots held, decayed mean over steps
        self._decay = 0.5 ** (1.0 / usage_half_life)

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

    def pick(self, waiting: Iterable[Sequence], running: Iterable[Sequence] = (),
             max_num_seqs: int | None = None) -> Sequence | None:
        """The oldest request of the waiting tenant with the least counter (``waiting`` in arrival
        order; ties go to the earlier arrival). Given ``running`` and ``max_num_seqs``, tenants
        whose recent slot usage is below their share go before those at or above it."""
        waiting = list(waiting)
        above = self._above_share(running, waiting, max_num_seqs)
        best: Sequence | None = None
        best_key = (False, 0.0)
        seen: set[str | None] = set()
        for seq in waiting:
            if seq.tenant in seen:
                continue
            seen.add(seq.tenant)
            key = (seq.tenant in above, self.counters.get(seq.tenant, 0.0))
            if best is None or key < best_key:
                best, best_key = seq, key
        return best

    def observe(self, running: Iterable[Sequence]) -> None:
        """Once per step: fold the slots each tenant holds now into its recent slot usage."""
        held = Counter(s.tenant for s in running)
        for tenant in set(self.slot_usage) | set(held):
            usage = self._decay * self.slot_usage.get(tenant, 0.0) + (1.0 - self._decay) * held[tenant]
            if usage < 1e-3 and not held[tenant]:
                self.slot_usage.pop(tenant, None)
            else:
                self.slot_usage[tenant] = usage

    def rebalance(self, running: list[Sequence], waiting: Iterable[Sequence], max_num_seqs: int) -> list[Sequence]:
        """Running sequences to preempt so that waiting tenants below their slot share get one.

        Only when every slot is taken. A waiting tenant W (least used per weight first) takes one
        slot this step from a running tenant D when all of these hold (shares s, weights w, recent
        usage u, slots held now h):

        - W is below its share, recently and now: ``u_W < s_W`` and ``h_W < s_W``;
        - D has been clearly above its own: ``u_D ≥ s_D + 1/2`` slot. Under a balanced load every
          tenant's usage hovers at its share, and trading slots at a hair's margin is what made
          ``fair`` slower than ``fcfs`` with no heavy tenant at all (each trade is a recompute,
          and the traded-away sequence is soon traded back): the half slot is the hysteresis;
        - the move does not swap their order: ``(h_D − 1) / w_D ≥ (h_W + 1) / w_W``, so D can
          never take the slot straight back.

        Among the donors the one furthest above its share (per weight) gives its newest sequence.

        Returns:
            The victims; the caller preempts them (nothing changes here).
        """
        if len(running) < max_num_seqs:
            return []
        waiting = list(waiting)
        share = self._shares(running, waiting, max_num_seqs)
        weight = {t: self.weights.get(t, 1.0) for t in share}
        usage = {t: self.slot_usage.get(t, 0.0) for t in share}
        held = Counter(s.tenant for s in running)
        victims: list[Sequence] = []
        for tenant in sorted({s.tenant for s in waiting}, key=lambda t: (usage[t] - share[t]) / weight[t]):
            if usage[tenant] >= share[tenant]:
                break
            if held[tenant] >= share[tenant]:
                continue
            donors = [t for t in held if t != tenant and usage[t] >= share[t] + self.HYSTERESIS_SLOTS
                      and (held[t] - 1) / weight[t] >= (held[tenant] + 1) / weight[tenant]]
            if not donors:
                continue
            donor = max(donors, key=lambda t: (usage[t] - share[t]) / weight[t])
            victims.append(max((s for s in running if s.tenant == donor and s not in victims), key=lambda s: s.arrival))
            held[donor] -= 1
            held[tenant] += 1
        return victims

    def _shares(self, running: Iterable[Sequence], waiting: Iterable[Sequence],
                max_num_seqs: int) -> dict[str | None, float]:
        """Slots per active tenant (running or waiting): ``max_num_seqs · w / Σw``."""
        active = {s.tenant for s in running} | {s.tenant for s in waiting}
        total = sum(self.weights.get(t, 1.0) for t in active)
        return {t: max_num_seqs * self.weights.get(t, 1.0) / total for t in active}

    def _above_share(self, running: Iterable[Sequence], waiting: list[Sequence], max_num_seqs: int | None) -> set:
        """Tenants whose recent slot usage is at or above their share (none without ``max_num_seqs``)."""
        running = list(running)
        if max_num_seqs is None or not running:
            return set()
        share = self._shares(running, waiting, max_num_seqs)
        return {t for t in share if self.slot_usage.get(t, 0.0) >= share[t]}

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
