"""Model-free replay of the fairness load (issue 20) through the real scheduler, in steps.

The scheduler alone decides who waits; on a loaded CPU the engine's step time moves between runs,
so the bench's seconds are noisy. Here every step takes one unit of time, requests arrive as
Poisson processes in steps, and each scheduled sequence computes its tokens at once: the same
scheduler code, no model, exact and repeatable. The load is bench/prefix_fairness.py's: ten
tenants, capacity C = max_num_seqs / (new tokens + 1) requests per step, nine light tenants at
C / divisor each (below their share C / 10) and a heavy one at 10× that. Printed per policy: each
light tenant's TTFT p99 (steps) with the heavy tenant over its value without it.

    .venv/bin/python bench/fairness_replay.py
"""

from __future__ import annotations

import argparse
import random

from nlora_serve.engine.block_manager import BlockManager
from nlora_serve.engine.config import SchedulerConfig
from nlora_serve.engine.sampling import SamplingParams
from nlora_serve.engine.scheduler import Scheduler
from nlora_serve.engine.sequence import Sequence


def arrivals(args, heavy: bool) -> list[tuple[float, str]]:
    rng = random.Random(args.seed)
    capacity = args.max_num_seqs / (args.new_tokens + 1)
    out = []
    for k in range(10):
        if k == 0 and not heavy:
            continue
        rate, t = capacity / args.divisor * (10 if k == 0 else 1), 0.0
        while (t := t + rng.expovariate(rate)) < args.steps * 0.7:
            out.append((t, f"t{k}"))
    return sorted(out)


def light_ttft_p99(args, policy: str, heavy: bool) -> dict[str, float]:
    """Each light tenant's TTFT p99 in steps (a request never served counts as waiting to the end)."""
    config = SchedulerConfig(policy=policy, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512,
                             max_model_len=args.prompt + args.new_tokens + 1)
    sched = Scheduler(config, BlockManager(4096, 16))
    pending, first, arrived = arrivals(args, heavy), {}, {}
    i = 0
    for now in range(args.steps):
        while i < len(pending) and pending[i][0] <= now:
            at, tenant = pending[i]
            seq = Sequence(f"r{i}", i, [5] * args.prompt, args.prompt, SamplingParams(), tenant=tenant)
            arrived[seq.request_id] = (at, tenant)
            sched.add(seq)
            i += 1
        batch = sched.schedule()
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(7)
                first.setdefault(seq.request_id, now + 1)
                if seq.num_tokens - args.prompt >= args.new_tokens:
                    sched.finish(seq)
    waits: dict[str, list[float]] = {}
    for rid, (at, tenant) in arrived.items():
        if tenant != "t0":
            waits.setdefault(tenant, []).append(first.get(rid, args.steps) - at)
    return {t: sorted(w)[min(len(w) - 1, int(0.99 * len(w)))] for t, w in sorted(waits.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--divisor", type=float, default=12.0, help="light rate = C / this")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    print("policy  light TTFT p99 with / without the heavy tenant: worst  median  (target <= 2x)")
    for policy in ("fcfs", "fair"):
        alone, mixed = light_ttft_p99(args, policy, False), light_ttft_p99(args, policy, True)
        ratios = sorted(mixed[t] / alone[t] for t in alone)
        print(f"{policy:6s}  {ratios[-1]:8.2f}x  {ratios[len(ratios) // 2]:6.2f}x")


if __name__ == "__main__":
    main()
