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

VTC orders admission only. With every running slot taken (``max_num_seqs`` binding), a light tenant
first in line still waits for a heavy tenant's decode to finish, and those waits grow with the step
time. So slots are shared too. Each active tenant (running or waiting) has a share of ``max_num_seqs
· w / Σw`` slots and a recent usage (:meth:`VirtualTokenCounter.usage`: the mean of the slots it
held per step, decayed). A tenant whose usage is half a slot or more above its share is over-served:
it is admitted only when no other tenant waits, and its prefill chunks take the step's token budget
after everyone else's. Among the others, admission goes to the least recent usage above share first
and only then to the least counter (:meth:`~VirtualTokenCounter.pick` says why). One that is three
quarters of a slot above its share and still has requests waiting (a backlog: it is not a burst that
ends by itself), or more than twice its share plus one with none waiting, gives its slots to the
waiting requests of tenants that are not over-served, at once, newest sequence first
(:meth:`~VirtualTokenCounter.rebalance`; the victim recomputes later, from the prefix cache where
one is on). So against a backlogged heavy tenant a light tenant below its share is served as if the
heavy one were absent, bursts beyond its share included, while the heavy tenant keeps every slot
nobody else wants and, once its usage falls to its share, competes as an equal again (no
starvation). And no tenant waits for long with no slot at all: one that has waited
:attr:`~VirtualTokenCounter.STARVED_STEPS` steps holding none takes a slot from an over-served
tenant that holds more than its share, waiting requests or not (a tenant that
keeps exactly ``max_num_seqs`` long requests running, never one waiting, is below every threshold
above: with two tenants ``2s + 1`` exceeds the slots there are). Usage rather than what is held
right now, and the margins, keep a load with no heavy tenant (nearly) free of preemptions: there
every tenant's usage hovers at or below its share, and trading slots at a hair's margin is what once
made ``fair`` slower than ``fcfs`` (each trade a recompute, soon traded back).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Mapping

from nlora_serve.engine.scheduling.sequence import Sequence


class VirtualTokenCounter:
    """Per-tenant service counters, the admission order and slot sharing.

    Holds the waiting sequences per tenant (the scheduler's queue, split by tenant), so that a
    pick costs one look per waiting tenant, not per waiting request: a heavy tenant's backlog of
    thousands would otherwise slow every step, everyone's included.

    Args:
        weights: tenant -> weight (> 0; a tenant absent here weighs 1): a weight-2 tenant gets
            twice the service of a weight-1 tenant when both are backlogged.
        prompt_weight, output_weight: service per prompt / output token (VTC's w_p, w_q).
        usage_half_life: steps over which a tenant's recent slot usage halves its weight on the
            past. Long enough that a light tenant's Poisson burst (a few requests of ~33 steps)
            averages out: at 64, nine light tenants at 75% load still preempted each other
            (bench/RESULTS.md, "Fair without a heavy tenant").
    """

    OVER_SLOTS = 0.5  # usage above its share from which a tenant is over-served (served last)
    YIELD_SLOTS = 0.75  # usage above its share from which a backlogged tenant gives up slots (rebalance)
    # steps a tenant waits holding no slot before it takes one from an over-served tenant (rebalance):
    # long enough that a burst which ends by itself is not preempted, short against a request's length
    STARVED_STEPS = 16
    # steps between drops of the counters of tenants gone idle (:meth:`_forget_idle`): a long-running
    # server otherwise keeps a counter for every tenant name it ever served
    FORGET_EVERY = 1024

    def __init__(self, weights: Mapping[str, float], prompt_weight: float = 1.0, output_weight: float = 2.0,
                 usage_half_life: float = 128.0):
        self.weights = dict(weights)
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.counters: dict[str | None, float] = {}  # service received, weighted (VTC's c_u)
        self.queues: dict[str | None, list[Sequence]] = {}  # waiting sequences per tenant, by arrival
        self._last_left: str | None = None  # the tenant whose waiting requests ran out last
        self.slot_usage: dict[str | None, float] = {}  # running slots held, exponential average, uncorrected
        self._decay = 0.5 ** (1.0 / usage_half_life)
        self._steps = 0  # steps observed
        self.share: dict[str | None, float] = {}  # slots per active tenant, as of the last observe()
        self.over: set[str | None] = set()  # over-served tenants, as of the last observe()
        self._taken: Counter = Counter()  # slots each tenant took in this step's admissions so far
        self._starved_since: dict[str | None, int] = {}  # waiting tenants holding no slot: the step it began

    def enqueue(self, seq: Sequence, new: bool) -> None:
        """``seq`` joins the waiting queue (``new``: a new request, else a preempted one, which
        goes back to its place by arrival)."""
        tenant = seq.tenant
        if new and tenant not in self.queues:
            floor = min((self.counters.get(t, 0.0) for t in self.queues),
                        default=self.counters.get(self._last_left, 0.0))
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        queue = self.queues.setdefault(tenant, [])
        if new:
            queue.append(seq)
        else:
            bisect.insort(queue, seq, key=lambda s: s.arrival)

    def dequeue(self, seq: Sequence) -> None:
        """``seq`` left the waiting queue (admitted, finished or aborted while waiting)."""
        queue = self.queues[seq.tenant]
        queue.remove(seq)
        if not queue:
            del self.queues[seq.tenant]
            if not self.queues:
                self._last_left = seq.tenant

    def observe(self, running: list[Sequence], max_num_seqs: int) -> None:
        """Once per step, before :meth:`rebalance` and :meth:`pick`: fold the slots each tenant
        holds now into its recent slot usage, and fix this step's shares (``max_num_seqs · w /
        Σw`` over the active tenants, running or waiting) and over-served set (usage at least
        :attr:`OVER_SLOTS` above the share). Admissions and preemptions within the step change
        neither: a tenant stays active while it runs or waits."""
        held = Counter(s.tenant for s in running)
        self._steps += 1
        for tenant in set(self.slot_usage) | set(held):
            usage = self._decay * self.slot_usage.get(tenant, 0.0) + (1.0 - self._decay) * held[tenant]
            if usage < 1e-3 and not held[tenant]:
                self.slot_usage.pop(tenant, None)
            else:
                self.slot_usage[tenant] = usage
        active = set(held) | set(self.queues)
        total = sum(self.weights.get(t, 1.0) for t in active)
        self.share = {t: max_num_seqs * self.weights.get(t, 1.0) / total for t in active}
        # half a slot above the share; for a share within a slot of all of them (a heavy weight),
        # half way from the share to all the slots, which a tenant holding every slot still reaches
        self.over = {t for t, s in self.share.items()
                     if self.usage(t) >= s + min(self.OVER_SLOTS, (max_num_seqs - s) / 2)}
        self._taken.clear()
        for tenant in [t for t in self._starved_since if held[t] or t not in self.queues]:
            del self._starved_since[tenant]
        for tenant in self.queues:
            if not held[tenant]:
                self._starved_since.setdefault(tenant, self._steps)
        if self._steps % self.FORGET_EVERY == 0:
            self._forget_idle(held)

    def _forget_idle(self, running: Counter) -> None:
        """Drop the counters of idle tenants (none running or waiting) that are at or below every
        counter still in play (the running and waiting tenants', and that of the tenant whose
        requests left the queue last, which :meth:`enqueue` lifts a returning tenant to when nobody
        waits). Exact: those counters only grow, and a tenant joining later is lifted to at least
        one of them, so a forgotten tenant that returns is lifted to the same counter it would have
        been lifted to anyway. Idle tenants above that floor (served more than everyone active)
        keep their counters. (Requests waiting for a LoRA slot, outside this queue, are ordered by
        their tenants' counters as stored: a forgotten tenant's reads 0 there, as a new tenant's.)"""
        in_play = set(running) | set(self.queues) | {self._last_left}
        floor = min(self.counters.get(t, 0.0) for t in in_play)
        for tenant in [t for t, c in self.counters.items() if c <= floor and t not in in_play]:
            del self.counters[tenant]

    def admitted(self, seq: Sequence) -> None:
        """``seq`` took a slot in this step: the step's later picks see its tenant a slot fuller."""
        self._taken[seq.tenant] += 1

    def usage(self, tenant: str | None) -> float:
        """Slots ``tenant`` held per step recently: the exponential average of :meth:`observe`,
        divided by ``1 − decay^steps`` (the bias correction of Adam's moment estimates, Kingma & Ba
        2015), so that over the first steps after a start it is the mean so far rather than a
        value still rising from 0: a tenant that filled every slot at once is seen doing so
        then, not a half-life later. Units: slots."""
        if not self._steps:
            return 0.0
        return self.slot_usage.get(tenant, 0.0) / (1.0 - self._decay ** self._steps)

    def excess(self, tenant: str | None) -> float:
        """Recent usage, plus the slots taken in this step so far, above the tenant's share, per
        unit of weight (slots; negative below it). Without the slots just taken, the tenant
        ranked first took every slot freed in a step (7 of 16 at once, all tenants backlogged)."""
        used = self.usage(tenant) + self._taken[tenant]
        return (used - self.share.get(tenant, 0.0)) / self.weights.get(tenant, 1.0)

    def pick(self) -> Sequence | None:
        """The oldest waiting request of the tenant that comes first: tenants not over-served
        before over-served ones, then the least recent usage above its share (:meth:`excess`),
        then the least counter (VTC), then the earlier arrival.

        Usage before the counter: a light tenant's burst lifts its counter past a backlogged heavy
        tenant's (VTC lifts a returning tenant to the least counter waiting: the heavy one's),
        and by counter alone the heavy tenant, holding more than its share of slots, then took
        every other slot the burst needed; on the issue-20 load just below saturation a light
        tenant's TTFT p99 grew ~1.6x median, up to 5.7x, with it present (`bench/fairness_replay.py
        --divisor 11`). The counter still orders tenants alike in usage (all new ones) and bills."""
        best: Sequence | None = None
        best_key: tuple = ()
        for tenant, queue in self.queues.items():
            key = (tenant in self.over, self.excess(tenant), self.counters.get(tenant, 0.0), queue[0].arrival)
            if best is None or key < best_key:
                best, best_key = queue[0], key
        return best

    def rebalance(self, running: list[Sequence], max_num_seqs: int) -> list[Sequence]:
        """Running sequences to preempt so that waiting tenants that are not over-served get a slot now.

        Only when every slot is taken. Donors: tenants with requests waiting whose recent usage
        is at least :attr:`YIELD_SLOTS` above their share (``u ≥ s + 3/4``), and tenants with none
        waiting that have used more than twice their share plus one (``u ≥ 2s + 1``: one that
        filled the server before anyone else came, where a light tenant's burst stays below).
        Every waiting request of a tenant that is not over-served (``u < s + 1/2``) takes one
        donor slot, the newest sequence of the donor furthest above its share (per weight) first,
        until either runs out: a burst beyond the taker's share is served too, since its usage
        says it is light. :meth:`pick` serves the takers before any over-served tenant, so the
        slots are not handed straight back.
        Then :meth:`_for_the_starved`: a tenant that has waited :attr:`STARVED_STEPS` steps
        holding no slot takes one from an over-served tenant holding more than its share.

        Returns:
            The victims; the caller preempts them (nothing changes here).
        """
        if len(running) < max_num_seqs:
            return []
        share = self.share
        donors = {t for t in share
                  if self.usage(t) >= share[t] + (self.YIELD_SLOTS if t in self.queues else share[t] + 1.0)}
        takers = sum(len(q) for t, q in self.queues.items() if t not in self.over)
        victims = sorted((s for s in running if s.tenant in donors), key=lambda s: (self.excess(s.tenant), s.arrival))
        victims = victims[::-1][:takers] if donors else []
        return victims + self._for_the_starved(running, victims)

    def _for_the_starved(self, running: list[Sequence], chosen: list[Sequence]) -> list[Sequence]:
        """One slot for each tenant that has waited :attr:`STARVED_STEPS` steps holding none (and
        is not over-served), from over-served tenants holding more than their share besides those
        in ``chosen``: the newest sequence of the one furthest above its share first, none taken
        below ``⌊share⌋`` (a weight-4 tenant holding all 3 slots against a weight-1 one, share
        2.4, gives one: below ``⌈share⌉ + 1`` = 4, once the bar, it never did)."""
        starved = [t for t, since in self._starved_since.items()
                   if self._steps - since >= self.STARVED_STEPS and t not in self.over]
        if not starved:
            return []
        taken = {id(s) for s in chosen}
        held = Counter(s.tenant for s in running if id(s) not in taken)
        spare = {t: held[t] - math.floor(self.share[t]) for t in self.over if t in self.share}
        victims = []
        for _ in starved:
            spare = {t: n for t, n in spare.items() if n >= 1}
            if not spare:
                break
            donor = max(spare, key=lambda t: (self.excess(t), t is not None, str(t)))
            victim = max((s for s in running if s.tenant == donor and id(s) not in taken), key=lambda s: s.arrival)
            taken.add(id(victim))
            victims.append(victim)
            spare[donor] -= 1
        return victims

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
