"""Where the light tenants' TTFT p99 comes from in the fairness replay (issue 20), per light tenant.

Runs bench/fairness_replay.py's load (same arguments, policy ``fair``) with and without the heavy
tenant and, for each light tenant's p99 request of each run, splits its TTFT (time units) into:
the wait for the next step boundary after it arrived, the queue wait (steps it spent queued, in
units), and the step that prefilled it. For the with-heavy request it also says, over the steps it
queued: how many had every slot busy, the most slots the heavy tenant held, whether the heavy
tenant was admitted or preempted meanwhile; and the slots the heavy tenant held at its admission.
The last lines: the light tenants' mean slots and the mean step time over the arrival window.

    .venv/bin/python bench/fairness_waits.py --row-cost 0.036 --divisor 12 --seed 1 --seeds 4
"""

from __future__ import annotations

import argparse
from collections import Counter

from fairness_replay import arrivals, replay, step_time

HEAVY = "t0"


class Trace:
    """The per-step facts a light request's wait is explained by, collected by ``replay``'s watch."""

    def __init__(self, args) -> None:
        self.args = args
        self.steps: list[dict] = []
        self.admitted: dict[str, int] = {}  # request id -> the step that first admitted it
        self.queued: dict[str, list[int]] = {}  # request id -> the steps it stayed queued through

    def __call__(self, sched, batch, now: float) -> None:
        held = Counter(s.tenant for s in sched.running)
        new = [s for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens == 0]
        heavy_rows = sum(s.tenant == HEAVY for s in batch.seqs)
        rows = len(batch.seqs) - (1 - self.args.heavy_row_fraction) * heavy_rows
        self.steps.append(dict(now=now, dur=step_time(self.args, rows, sum(n for n in batch.num_tokens if n > 1)),
                               busy=len(sched.running) == self.args.max_num_seqs, heavy=held[HEAVY],
                               light=len(sched.running) - held[HEAVY],
                               heavy_in=sum(s.tenant == HEAVY for s in new),
                               heavy_out=sum(s.tenant == HEAVY for s in batch.preempted)))
        k = len(self.steps) - 1
        for s in new:
            self.admitted.setdefault(s.request_id, k)
        for s in sched.waiting:
            if s.tenant != HEAVY and s.request_id not in self.admitted:
                self.queued.setdefault(s.request_id, []).append(k)


def tails(args, heavy: bool) -> tuple[dict[str, dict], Trace]:
    """Each light tenant's p99 request (by TTFT), explained; and the run's trace."""
    trace = Trace(args)
    replay(args, "fair", heavy, trace)
    by_tenant: dict[str, list[dict]] = {}
    for i, (at, tenant) in enumerate(arrivals(args, heavy)):
        rid = f"r{i}"
        if tenant == HEAVY or rid not in trace.admitted:
            continue
        k, queued = trace.admitted[rid], trace.queued.get(rid, [])
        first = trace.steps[queued[0] if queued else k]["now"]
        adm = trace.steps[k]
        waited = [trace.steps[j] for j in queued]
        by_tenant.setdefault(tenant, []).append(dict(
            ttft=adm["now"] + adm["dur"] - at, boundary=first - at, queue=adm["now"] - first, own=adm["dur"],
            steps=len(queued), busy=sum(s["busy"] for s in waited), heavy_max=max((s["heavy"] for s in waited), default=0),
            heavy_in=sum(s["heavy_in"] for s in waited), heavy_out=sum(s["heavy_out"] for s in waited) + adm["heavy_out"],
            heavy_at=adm["heavy"]))
    out = {}
    for tenant, reqs in sorted(by_tenant.items()):
        reqs.sort(key=lambda r: r["ttft"])
        out[tenant] = reqs[min(len(reqs) - 1, int(0.99 * len(reqs)))]
    return out, trace


def window_means(args, trace: Trace) -> tuple[float, float]:
    """The light tenants' mean running slots and the mean step time while requests arrive."""
    steps = [s for s in trace.steps if s["now"] < args.steps * 0.7]
    return sum(s["light"] for s in steps) / len(steps), sum(s["dur"] for s in steps) / len(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default in (("--max-num-seqs", int, 16), ("--prompt", int, 64), ("--new-tokens", int, 32),
                                ("--divisor", float, 12.0), ("--prefill-cost", float, 0.0), ("--token-cost", float, 0.0),
                                ("--row-cost", float, 0.0), ("--heavy-row-fraction", float, 1.0), ("--steps", int, 1500),
                                ("--seed", int, 1), ("--seeds", int, 4)):
        ap.add_argument(flag, type=kind, default=default)
    args = ap.parse_args()
    print("ratio seed tenant | alone: ttft = to step + queued + own step (steps) | with heavy: the same | "
          "with heavy, steps queued: all busy, heavy's most slots, heavy admitted, heavy preempted | heavy's slots at admission")
    rows, means = [], []
    for args.seed in range(args.seed, args.seed + args.seeds):
        (alone, trace_alone), (mixed, trace_mixed) = tails(args, False), tails(args, True)
        means.append(window_means(args, trace_alone) + window_means(args, trace_mixed))
        rows += [(mixed[t]["ttft"] / alone[t]["ttft"], args.seed, t, alone[t], mixed[t]) for t in alone]
    for ratio, seed, tenant, a, m in sorted(rows, key=lambda r: r[0]):
        cells = [f"{r['ttft']:6.2f} = {r['boundary']:4.2f} + {r['queue']:5.2f} + {r['own']:4.2f} ({r['steps']:2d})" for r in (a, m)]
        print(f"{ratio:5.2f} {seed:4d} {tenant:3s} | {cells[0]} | {cells[1]} | {m['busy']:2d} {m['heavy_max']:2d} "
              f"{m['heavy_in']:2d} {m['heavy_out']:2d} | {m['heavy_at']:2d}")
    n = len(rows)
    print(f"{n} light tenants: ratio median {sorted(r[0] for r in rows)[n // 2]:.2f}x, within 2x {sum(r[0] <= 2 for r in rows)}; "
          f"with heavy, the p99 request queued behind slots the heavy tenant held (its most > 0): "
          f"{sum(r[4]['heavy_max'] > 0 for r in rows)}, the heavy tenant admitted while it queued: "
          f"{sum(r[4]['heavy_in'] > 0 for r in rows)}")
    light_a, dur_a, light_m, dur_m = (sum(m[i] for m in means) / len(means) for i in range(4))
    print(f"arrival window, light tenants' mean slots / mean step (units): alone {light_a:.2f} / {dur_a:.3f}, "
          f"with heavy {light_m:.2f} / {dur_m:.3f}")


if __name__ == "__main__":
    main()
