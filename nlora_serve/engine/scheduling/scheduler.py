"""Continuous batching: which sequences run this step and how many tokens each.

Every step the scheduler admits and retires sequences (DESIGN §5). Order of service:
1. running sequences that decode (one token each), oldest first;
2. running sequences still in prefill, oldest first, each a chunk of what the budget leaves;
3. waiting sequences: with policy "fcfs" strictly first come first served, with "fair" the oldest
   request of the tenant with the least recent slot usage above its share, then the least service
   (VTC; fairness.py), over-served tenants (usage well above their share) last; the one picked is
   admitted or nobody is, so a long prompt is never overtaken forever (no starvation). With "fair" and every slot taken, tenants that are
   not over-served first take slots from a backlogged tenant clearly above its share (its newest
   sequences are preempted; fairness.py's rebalance has the rule, which keeps a load with no heavy
   tenant free of preemptions); and an over-served tenant's prefill chunks (step 2) come after the
   admissions, so its chunked prefills never take the budget ahead of a light tenant's prompt.
A waiting sequence starts after the longest prefix of its tokens already in the KV cache when the
block manager caches prefixes (prefix_cache.py); full blocks are offered to that cache once computed.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it is re-queued by arrival to recompute its tokens later. With
"fair", the deferred prefills of over-served tenants (step 2's exception) go first, newest first:
they hold blocks but come last for the budget, so a newer light sequence short of blocks would
otherwise preempt itself, be re-admitted into the budget the deferred chunk needed, and neither
ever finished (a livelock). A deferred prefill short of blocks preempts only deferred ones (itself
if it is the newest), so it never undoes an admission; before, it merely waited, and with the
head of the queue short of blocks too every later step was empty (tests/engine/test_fair_heavy.py).
With ``long_prefill_token_threshold`` > 0 and more than one request running or waiting, a prefill
(continued or admitted) with more than the threshold left to compute gets the threshold this step,
so one tenant's long prompts cannot fill every step and stall the others' decodes and short prompts
(vLLM 0.32's rule, v1/core/sched/scheduler.py; alone, a prompt takes the whole budget). Left unset
(None), the threshold is 0 (off, vLLM's default) under "fcfs" and, under "fair",
``FAIR_LONG_PREFILL_TOKEN_THRESHOLD`` (128) in the steps where requests of more than one tenant run
or wait: on the CPU a tenant's two 1,218-token prompts otherwise held another tenant's stream to
gaps of seconds (bench/RESULTS.md), while one tenant alone keeps whole-budget prefills. An explicit
0 is off, as in vLLM; on CUDA EngineConfig turns the unset threshold into 0 (unmeasured there).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.config import FAIR_LONG_PREFILL_TOKEN_THRESHOLD, SchedulerConfig
from nlora_serve.engine.scheduling.fairness import VirtualTokenCounter
from nlora_serve.engine.scheduling.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes its next ``num_tokens[i]`` tokens."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed this step, per sequence
    preempted: list[Sequence] = field(default_factory=list)  # lost their blocks in this step
    total_tokens: int = 0  # sum of num_tokens, kept as they change (summing per sequence was O(n²))

    def add(self, seq: Sequence, n: int) -> None:
        """Give ``seq`` ``n`` tokens this step."""
        self.seqs.append(seq)
        self.num_tokens.append(n)
        self.total_tokens += n

    def remove(self, seq: Sequence) -> int:
        """Drop ``seq`` from the batch; returns the tokens it had been given (0 if absent)."""
        for i, s in enumerate(self.seqs):
            if s is seq:
                del self.seqs[i]
                n = self.num_tokens.pop(i)
                self.total_tokens -= n
                return n
        return 0


class Scheduler:
    """Owns the waiting queue and the running set; the only caller of the block manager."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()  # sorted by arrival
        self.running: list[Sequence] = []  # admission order (a re-admitted sequence goes last)
        self.fair = VirtualTokenCounter(config.tenant_weights) if config.policy == "fair" else None
        self._deferred: list[Sequence] = []  # this step's deferred prefills (over-served tenants)
        self._cap = 0  # this step's long-prefill cap in tokens (0: none; module docstring)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (its ``arrival`` must be the largest so far)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        if self.fair is not None:
            self.fair.enqueue(seq, new=True)

    def has_work(self) -> bool:
        """True while a sequence waits or runs."""
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Retire ``seq`` (finished, stopped, aborted or failed): frees its blocks exactly once."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.commit(seq)
        else:
            self._unqueue(seq)
        self.blocks.free(seq.block_table)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        """Pick this step's sequences and token counts, growing block tables to fit them."""
        batch = ScheduledBatch()
        for seq in self.running:  # what the last step computed
            self.blocks.commit(seq)
        later: list[Sequence] = []  # prefill chunks of over-served tenants: after admissions
        if self.fair is not None:  # slot-level fairness: before anyone is given tokens this step
            self.fair.observe(self.running, self.config.max_num_seqs)
            for victim in self.fair.rebalance(self.running, self.config.max_num_seqs):
                self._preempt(victim)
                batch.preempted.append(victim)
            later = [s for s in self.running if s.tenant in self.fair.over and s.num_uncomputed > 1]
        self._deferred = later
        self._cap = self._long_prefill_cap()
        now = [s for s in self.running if s not in later]
        self._continue(sorted(now, key=lambda s: (s.num_uncomputed > 1, s.arrival)), batch)
        self._admit(batch, self.config.max_num_batched_tokens - batch.total_tokens)
        self._continue(later, batch)  # preempts deferred ones only: never a sequence just admitted
        return batch

    def _continue(self, seqs: list[Sequence], batch: ScheduledBatch) -> None:
        """Give running ``seqs``, in this order, their next tokens (one to decode, or a prefill
        chunk) while the step's token budget lasts; a sequence short of blocks preempts others
        (:meth:`_reserve`). Bills them once all are placed (a sequence preempted here after being
        given tokens computes nothing)."""
        start = len(batch.seqs)
        for seq in seqs:
            budget = self.config.max_num_batched_tokens - batch.total_tokens
            # its last token is in flight (async scheduling): nothing more to compute for it
            done = seq.token_ids[-1] == PLACEHOLDER and seq.num_output_tokens >= seq.params.max_tokens
            if seq.status is not SequenceStatus.RUNNING or budget == 0 or done:
                continue
            n = min(self._chunk(seq.num_uncomputed), budget)
            if self._reserve(seq, n, batch):
                batch.add(seq, n)
        if self.fair is not None:
            for seq, n in zip(batch.seqs[start:], batch.num_tokens[start:]):
                self.fair.charge(seq, n)

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit waiting sequences (step 3 of the module docstring) into ``batch`` while ``budget``
        (tokens) and the running slots (``max_num_seqs``) last, each after its prefix-cache hit."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0] if self.fair is None else self.fair.pick()
            hit = self.blocks.match(seq)
            cached = len(hit) * self.blocks.block_size
            n = min(self._chunk(seq.num_tokens - cached), budget)
            if not self.blocks.admit(seq, hit, cached + n):
                return  # the one picked waits for blocks; others may not overtake it
            self._unqueue(seq)
            if self.fair is not None:  # at once: the next pick in this step sees it
                self.fair.charge(seq, n)
                self.fair.admitted(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n

    def _long_prefill_cap(self) -> int:
        """Tokens a long prefill may compute this step: ``long_prefill_token_threshold`` (unset: the
        policy's default, module docstring), floored at ``max_num_batched_tokens`` // requests with
        ``long_prefill_token_threshold_adaptive``; 0 (no cap) when it is off or one request is all
        there is (nobody to starve). Call after ``fair.observe`` (its ``share`` has this step's
        active tenants)."""
        cfg, num_requests = self.config, len(self.running) + len(self.waiting)
        threshold = cfg.long_prefill_token_threshold
        if threshold is None:  # between tenants under "fair" only
            threshold = FAIR_LONG_PREFILL_TOKEN_THRESHOLD if self.fair is not None and len(self.fair.share) > 1 else 0
        if threshold == 0 or num_requests <= 1:
            return 0
        if cfg.long_prefill_token_threshold_adaptive:
            return max(threshold, cfg.max_num_batched_tokens // num_requests)
        return threshold

    def _chunk(self, num_left: int) -> int:
        """Tokens to compute this step for a sequence with ``num_left`` uncomputed, before the budget."""
        return self._cap if 0 < self._cap < num_left else num_left

    def _reserve(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Grow ``seq``'s blocks for ``n`` more tokens, preempting newest first (deferred prefills
        before anyone, and a deferred ``seq`` only those: module docstring); False if ``seq``
        itself went."""
        target = seq.num_computed_tokens + n
        while not self.blocks.can_grow(seq.block_table, target):
            deferred = [s for s in self._deferred if s.status is SequenceStatus.RUNNING]
            victim = max(deferred or self.running, key=lambda s: s.arrival)
            batch.remove(victim)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, target, seq.tenant)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and re-queue it by arrival; it recomputes prompt + output later."""
        self.running.remove(seq)
        self.blocks.commit(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        arrivals = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(arrivals, seq.arrival), seq)
        if self.fair is not None:
            self.fair.enqueue(seq, new=False)

    def _unqueue(self, seq: Sequence) -> None:
        """Take ``seq`` out of the waiting queue (and the fair scheduler's)."""
        self.waiting.remove(seq)
        if self.fair is not None:
            self.fair.dequeue(seq)
