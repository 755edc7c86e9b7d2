"""Model-free replay of the fairness load (issue 20) through the real scheduler, in steps.

The scheduler alone decides who waits; on a loaded CPU the engine's step time moves between runs,
so the bench's seconds are noisy. Here requests arrive as Poisson processes in time units and
each scheduled sequence computes its tokens at once: the same scheduler code, no model, exact and
repeatable. A decode-only step takes one unit; a step that prefills (a new request, or one
recomputing after a preemption) takes ``1 + --prefill-cost`` units plus ``--token-cost`` per
prefill token: on a GPU such steps run eager, not as a captured graph, and on a CPU they cost
per token, which is what makes needless preemptions expensive. With ``--row-cost`` every step's
time also moves by that many units per row (sequence in the batch) above or below
``max_num_seqs``, so a full decode step still takes one unit (C stays the burst's measure) and a
step with fewer rows is shorter: on a CPU a decode step's time grows with its rows (tiny-llama, one
torch thread: 2.79 ms at ~10 rows, 3.69 ms at 16, so ~0.036 of a full step per row);
``--heavy-row-fraction F`` prices the heavy tenant's rows at F of that (a counterfactual: at 0 its
rows cost the light tenants nothing). The load is
bench/prefix_fairness.py's: ten tenants, capacity C = max_num_seqs / (new tokens + 1) requests per
unit (a decode-only measure, as the bench's burst), nine light tenants at C / divisor each (below
their share C / 10) and a heavy one at 10x that. Printed per policy: the light tenants' TTFT p99
(units) without the heavy tenant, with it, their ratio, the preemptions of each run, and the
premise (bench/prefix_fairness.py's: a light tenant's rate over a tenth of the requests per unit
completed with the heavy tenant present; below 1 the light tenants are below their share).

    .venv/bin/python bench/fairness_replay.py
    .venv/bin/python bench/fairness_replay.py --prefill-cost 1    # the H200 light-only case
    .venv/bin/python bench/fairness_replay.py --divisor 15 --seed 1 --seeds 4   # pooled over seeds
    .venv/bin/python bench/fairness_replay.py --row-cost 0.036 --seed 1 --seeds 4   # the CPU engine's step
"""

from __future__ import annotations

import argparse
import random

from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.config import SchedulerConfig
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.scheduler import Scheduler
from nlora_serve.engine.scheduling.sequence import Sequence


def arrivals(args, heavy: bool) -> list[tuple[float, str]]:
    capacity = args.max_num_seqs / (args.new_tokens + 1)
    out = []
    for k in range(10):
        if k == 0 and not heavy:
            continue
        rng = random.Random(args.seed * 1000 + k)  # per tenant: the light arrivals are the same either way
        rate, t = capacity / args.divisor * (10 if k == 0 else 1), 0.0
        while (t := t + rng.expovariate(rate)) < args.steps * 0.7:
            out.append((t, f"t{k}"))
    return sorted(out)


def replay(args, policy: str, heavy: bool, watch=None) -> tuple[dict[str, float], int, float]:
    """Each light tenant's TTFT p99 in time units (a request never served counts as waiting to
    the end), the preemptions of the run, and the requests completed per unit of time.
    ``watch(sched, batch, now)``, if given, is called after each ``schedule()`` (instrumentation)."""
    config = SchedulerConfig(policy=policy, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512,
                             max_model_len=args.prompt + args.new_tokens + 1)
    sched = Scheduler(config, BlockManager(4096, 16))
    pending, first, arrived = arrivals(args, heavy), {}, {}
    i, now, preempted, done = 0, 0.0, 0, 0
    for _ in range(args.steps):
        while i < len(pending) and pending[i][0] <= now:
            at, tenant = pending[i]
            seq = Sequence(f"r{i}", i, [5] * args.prompt, args.prompt, SamplingParams(), tenant=tenant)
            arrived[seq.request_id] = (at, tenant)
            sched.add(seq)
            i += 1
        batch = sched.schedule()
        if watch is not None:
            watch(sched, batch, now)
        preempted += len(batch.preempted)
        prefill = sum(n for n in batch.num_tokens if n > 1)
        heavy_rows = sum(s.tenant == "t0" for s in batch.seqs)
        now += step_time(args, len(batch.seqs) - (1 - args.heavy_row_fraction) * heavy_rows, prefill)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
                first.setdefault(seq.request_id, now)
                if seq.num_tokens - args.prompt >= args.new_tokens:
                    sched.finish(seq)
                    done += 1
    waits: dict[str, list[float]] = {}
    for rid, (at, tenant) in arrived.items():
        if tenant != "t0":
            waits.setdefault(tenant, []).append(first.get(rid, now) - at)
    p99 = {t: sorted(w)[min(len(w) - 1, int(0.99 * len(w)))] for t, w in sorted(waits.items())}
    return p99, preempted, done / now


def step_time(args, rows: float, prefill_tokens: int) -> float:
    """Units a step takes: 1 for a full decode step, ``--row-cost`` per row more or less, plus the
    prefill terms. Never below a tenth of a unit (an empty step still has its overheads)."""
    t = 1 + args.row_cost * (rows - args.max_num_seqs)
    if prefill_tokens:
        t += args.prefill_cost + args.token_cost * prefill_tokens
    return max(0.1, t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--divisor", type=float, default=12.0, help="light rate = C / this")
    ap.add_argument("--prefill-cost", type=float, default=0.0, help="extra units of a step that prefills")
    ap.add_argument("--token-cost", type=float, default=0.0, help="extra units per prefill token")
    ap.add_argument("--row-cost", type=float, default=0.0, help="units per batch row more or fewer than "
                    "max_num_seqs (a CPU's decode step grows with its rows; 0: every step one unit)")
    ap.add_argument("--heavy-row-fraction", type=float, default=1.0, help="the heavy tenant's rows cost this "
                    "fraction of --row-cost (a counterfactual)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=1, help="seeds --seed .. --seed + N - 1: one row each, then "
                    "the ratios of all light tenants of all seeds pooled")
    args = ap.parse_args()
    print("light TTFT p99 (time units), worst / median over the nine; preemptions of each run")
    print("policy seed  alone            with the heavy one   ratio with / without    preemptions alone, with  premise")
    first = args.seed
    for policy in ("fcfs", "fair"):
        pooled = []
        for args.seed in range(first, first + args.seeds):
            (alone, pre_alone, _), (mixed, pre_mixed, served) = replay(args, policy, False), replay(args, policy, True)
            premise = args.max_num_seqs / (args.new_tokens + 1) / args.divisor / (served / 10)
            pooled += [mixed[t] / alone[t] for t in alone]
            cells = []
            for values in (alone.values(), mixed.values(), [mixed[t] / alone[t] for t in alone]):
                ordered = sorted(values)
                cells.append(f"{ordered[-1]:8.1f} {ordered[len(ordered) // 2]:7.1f}")
            print(f"{policy:6s} {args.seed:4d} {cells[0]}   {cells[1]}      {cells[2]}x        {pre_alone:6d} {pre_mixed:6d}     {premise:.2f}")
        if args.seeds > 1:
            pooled.sort()
            n = len(pooled)
            print(f"{policy:6s} all {n} light tenants: ratio median {pooled[n // 2]:.2f}x, 75th pct "
                  f"{pooled[int(0.75 * n)]:.2f}x, within 2x: {sum(r <= 2 for r in pooled)}/{n}, worst {pooled[-1]:.2f}x")


if __name__ == "__main__":
    main()
