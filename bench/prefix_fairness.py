"""Issue 20 benchmarks: adapter-aware prefix caching and fair scheduling, on our engine in-process.

(1) Prefix caching. Every tenant has its own tied adapter and sends requests that start with one
shared system prompt (``--prefix-tokens``, 1,024 by default) and end with a short unique question,
so blocks are reused within a tenant only. Cache off vs on, same workload, one run:
  - capacity: a burst (all requests at once); throughput ratio on/off;
  - Poisson arrivals at half the cache-off capacity: TTFT p50 off / on, hit rate (cached / prompt tokens).
(2) Fairness, ``fcfs`` vs ``fair`` side by side, ``--tenants-fair`` tenants (first one heavy):
  - the heavy tenant at 10x the rate of each light one, server overloaded, light tenants below
    their share: each light tenant's TTFT p99 against the same run without the heavy tenant;
  - all tenants backlogged (the heavy one with 10x the requests queued): Jain's index of the
    service each tenant got (VTC's measure: prompt + 2 x output tokens) while all were backlogged.

    .venv/bin/python bench/prefix_fairness.py                      # defaults: a few minutes each
    .venv/bin/python bench/prefix_fairness.py --only prefix --tenants 8 --burst 64

Prints a table and writes JSON (default bench/out/prefix_fairness.json). Times are wall-clock on
whatever machine runs it: compare the ratios, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.models import load_base, resolve_dtype
from nlora_serve.serving.commands.example_tenants import ensure_example_tenants


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def log(what: str, value) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {json.dumps(value)}", flush=True)


def jain(shares: list[float]) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all equal, 1/n when one has all."""
    return sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares))


class Job:
    __slots__ = ("tenant", "adapter", "prompt", "at", "ttft", "done", "tokens", "cached", "events")

    def __init__(self, tenant: str, adapter: str | None, prompt: list[int], at: float):
        self.tenant, self.adapter, self.prompt, self.at = tenant, adapter, prompt, at
        self.ttft = self.done = None
        self.tokens = self.cached = 0
        self.events: list[tuple[float, int]] = []  # (seconds from the start, tokens streamed then)


async def drive(engine: LLMEngine, jobs: list[Job], params: SamplingParams) -> float:
    """Submit every job at its ``at`` (seconds from now), stream it; returns the wall time (s)."""
    start = time.perf_counter()

    async def one(job: Job) -> None:
        await asyncio.sleep(max(0.0, start + job.at - time.perf_counter()))
        sent = time.perf_counter()
        async for out in engine.add_request(job.prompt, params, adapter=job.adapter, tenant=job.tenant):
            if out.token_ids and job.ttft is None:
                job.ttft = time.perf_counter() - sent
            job.tokens += len(out.token_ids)
            job.events.append((time.perf_counter() - start, len(out.token_ids)))
            if out.finished:
                job.cached, job.done = out.cached_tokens, time.perf_counter() - start

    await asyncio.gather(*(one(j) for j in jobs))
    return time.perf_counter() - start


def make_engine(args, base, store: Path, caching: bool, policy: str, max_len: int) -> LLMEngine:
    blocks = -(-max_len // 16) * args.max_num_seqs * 2
    config = EngineConfig(model=args.model, dtype=base.dtype, adapter_dir=str(store), device=args.device,
                          load_format=args.load_format,
                          scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget,
                                                    max_model_len=max_len, policy=policy,
                                                    long_prefill_token_threshold=args.long_prefill_token_threshold),
                          cache=CacheConfig(block_size=16, num_blocks=blocks), enable_prefix_caching=caching)
    return LLMEngine(config, base)


def prefix_jobs(args, rng: random.Random, vocab: int, arrivals: list[float]) -> list[Job]:
    system = [rng.randrange(100, vocab) for _ in range(args.prefix_tokens)]
    jobs = []
    for i, at in enumerate(arrivals):
        tenant = i % args.tenants
        question = [rng.randrange(100, vocab) for _ in range(args.suffix_tokens)]
        jobs.append(Job(f"t{tenant}", f"tenant-{tenant:03d}", system + question, at))
    return jobs


def bench_prefix(args, base, store: Path) -> dict:
    vocab = base.spec.vocab_size
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    max_len = args.prefix_tokens + args.suffix_tokens + args.new_tokens
    result = {}
    for caching in (False, True):
        with make_engine(args, base, store, caching, args.prefix_policy, max_len) as engine:
            ensure_example_tenants(base, engine.adapters, args.tenants)
            jobs = prefix_jobs(args, random.Random(1), vocab, [0.0] * args.burst)
            wall = asyncio.run(drive(engine, jobs, params))
            result[f"burst_{'on' if caching else 'off'}"] = {
                "wall_s": wall, "requests_per_s": len(jobs) / wall,
                "hit_rate": sum(j.cached for j in jobs) / sum(len(j.prompt) for j in jobs)}
            log(f"burst cache {'on' if caching else 'off'}", result[f"burst_{'on' if caching else 'off'}"])
    rate = result["burst_off"]["requests_per_s"] / 2
    rng = random.Random(2)
    arrivals, t = [], 0.0
    for _ in range(args.poisson_requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    for caching in (False, True):
        with make_engine(args, base, store, caching, args.prefix_policy, max_len) as engine:
            jobs = prefix_jobs(args, random.Random(3), vocab, arrivals)
            wall = asyncio.run(drive(engine, jobs, params))
            ttfts = [j.ttft for j in jobs]
            result[f"poisson_{'on' if caching else 'off'}"] = {
                "rate_per_s": rate, "wall_s": wall, "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
                "hit_rate": sum(j.cached for j in jobs) / sum(len(j.prompt) for j in jobs)}
            log(f"poisson cache {'on' if caching else 'off'}", result[f"poisson_{'on' if caching else 'off'}"])
    result["ttft_p50_ratio_off_on"] = result["poisson_off"]["ttft_p50_s"] / result["poisson_on"]["ttft_p50_s"]
    result["burst_throughput_ratio_on_off"] = result["burst_on"]["requests_per_s"] / result["burst_off"]["requests_per_s"]
    return result


def fair_jobs(args, vocab: int, light_rate: float, heavy: bool, duration: float, seed: int) -> list[Job]:
    jobs = []
    for k in range(args.tenants_fair):
        rate = light_rate * (10 if k == 0 else 1)
        if k == 0 and not heavy:
            continue
        rng = random.Random(seed * 1000 + k)  # per tenant: the light arrivals are the same either way
        t = rng.expovariate(rate)
        while t < duration:
            jobs.append(Job(f"t{k}", None, [rng.randrange(100, vocab) for _ in range(args.fair_prompt)], t))
            t += rng.expovariate(rate)
    return sorted(jobs, key=lambda j: j.at)


def bench_fairness(args, base, store: Path) -> dict:
    vocab = base.spec.vocab_size
    params = SamplingParams(max_tokens=args.fair_new_tokens, temperature=0.0, ignore_eos=True)
    max_len = args.fair_prompt + args.fair_new_tokens
    capacity = args.capacity
    if capacity is None:  # requests/s of a burst (decode-only steps: Poisson arrivals get less)
        with make_engine(args, base, store, False, "fcfs", max_len) as engine:
            burst = [Job("t0", None, [random.Random(i).randrange(100, vocab) for _ in range(args.fair_prompt)], 0.0)
                     for i in range(2 * args.max_num_seqs)]
            capacity = len(burst) / asyncio.run(drive(engine, burst, params))
    light_rate = capacity / args.overload_divisor  # 9 light: below capacity; with the heavy: over it
    result = {"capacity_per_s": capacity, "light_rate_per_s": light_rate}
    log("fairness capacity", result)
    caching = args.fair_cache == "on"
    for policy in ("fcfs", "fair"):
        row = {}
        for heavy in (False, True):
            with make_engine(args, base, store, caching, policy, max_len) as engine:
                jobs = fair_jobs(args, vocab, light_rate, heavy, args.duration, seed=5)
                asyncio.run(drive(engine, jobs, params))
                # what the policy cost: preemptions recompute, and mixed steps run eager on a GPU
                counts = {k: v for k, v in engine.core.stats().items()
                          if k in ("steps", "preemptions", "computed_tokens", "graph_steps", "eager_steps")}
            key = "with_heavy" if heavy else "alone"
            row[key] = {f"t{k}": pct([j.ttft for j in jobs if j.tenant == f"t{k}"], 0.99)
                        for k in range(1, args.tenants_fair)}
            if heavy:  # saturated all along: what it completed is its capacity under this very load
                served = sum(1 for j in jobs if j.done is not None and j.done <= args.duration) / args.duration
                row["served_per_s"] = served
                # the premise: each light tenant below its share, C / tenants, of this capacity
                # (none finished within --duration: the share is 0 and every rate is over it)
                row["light_rate_over_share"] = light_rate / (served / args.tenants_fair) if served else float("inf")
                log(f"{policy} with heavy: served requests/s, light rate / share", [served, row["light_rate_over_share"]])
            row[f"{key}_engine"] = counts
            log(f"{policy} {'with' if heavy else 'without'} heavy: light TTFT p99", row[key])
            log(f"{policy} {'with' if heavy else 'without'} heavy: engine", counts)
        row["worst_light_p99_ratio"] = max(row["with_heavy"][t] / row["alone"][t] for t in row["alone"])
        row["jain_backlogged"] = backlogged_jain(args, base, store, policy, params, max_len)
        log(f"{policy} backlogged Jain", row["jain_backlogged"])
        result[policy] = row
    return result


def backlogged_jain(args, base, store: Path, policy: str, params: SamplingParams, max_len: int) -> float:
    """Everybody queued at once (the heavy tenant 10x as many); Jain's index of the service each got
    up to the moment the first tenant ran out of queued requests."""
    vocab = base.spec.vocab_size
    rng = random.Random(7)
    jobs = [Job(f"t{k}", None, [rng.randrange(100, vocab) for _ in range(args.fair_prompt)], 0.0)
            for k in range(args.tenants_fair) for _ in range(args.backlog * (10 if k == 0 else 1))]
    rng.shuffle(jobs)
    with make_engine(args, base, store, args.fair_cache == "on", policy, max_len) as engine:
        asyncio.run(drive(engine, jobs, params))
    # a tenant stops being backlogged when its last request starts (nothing of it waits any more)
    until = min(max(j.events[0][0] for j in jobs if j.tenant == f"t{k}") for k in range(args.tenants_fair))
    service = [sum((len(j.prompt) if j.events[0][0] <= until else 0)
                   + 2 * sum(n for t, n in j.events if t <= until) for j in jobs if j.tenant == f"t{k}")
               for k in range(args.tenants_fair)]
    log(f"{policy} backlogged service until {until:.1f} s", service)
    return jain(service)


def print_table(res: dict) -> None:
    if "prefix" in res:
        p = res["prefix"]
        print("prefix caching            cache off    cache on    ratio")
        print(f"burst requests/s          {p['burst_off']['requests_per_s']:9.2f}  {p['burst_on']['requests_per_s']:10.2f}"
              f"   {p['burst_throughput_ratio_on_off']:5.2f}x (target >= 1.5x)")
        print(f"Poisson TTFT p50 (s)      {p['poisson_off']['ttft_p50_s']:9.3f}  {p['poisson_on']['ttft_p50_s']:10.3f}"
              f"   {p['ttft_p50_ratio_off_on']:5.2f}x lower (target >= 5x)")
        print(f"Poisson hit rate          {p['poisson_off']['hit_rate']:9.2%}  {p['poisson_on']['hit_rate']:10.2%}")
    if "fairness" in res:
        f = res["fairness"]
        print("fairness                       fcfs      fair")
        print(f"worst light TTFT p99 ratio  {f['fcfs']['worst_light_p99_ratio']:7.2f}x  {f['fair']['worst_light_p99_ratio']:7.2f}x"
              "  (with / without the heavy tenant; target <= 2x)")
        print(f"Jain's index, backlogged    {f['fcfs']['jain_backlogged']:8.3f}  {f['fair']['jain_backlogged']:8.3f}"
              "  (target >= 0.98)")
        print(f"light rate / share of the served capacity {f['fair']['light_rate_over_share']:.2f} "
              f"(served {f['fair']['served_per_s']:.1f} requests/s with the heavy tenant; the premise needs < 1)")
        for key, what in (("alone", "without"), ("with_heavy", "with")):
            cells = "".join(f"  {f[p][key + '_engine'].get('preemptions', 0):4d} / {max(f[p][key].values()):6.3f}"
                            for p in ("fcfs", "fair"))
            print(f"preemptions / worst light TTFT p99 (s), {what} the heavy tenant:{cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                    help="dummy: random weights from the model directory's config.json (e.g. bench/models/smollm2-135m)")
    ap.add_argument("--only", choices=["prefix", "fairness"], default=None)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    ap.add_argument("--tenants", type=int, default=64, help="prefix: tenants (one tied adapter each)")
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--burst", type=int, default=256, help="prefix: requests in the burst")
    ap.add_argument("--poisson-requests", type=int, default=256)
    ap.add_argument("--prefix-policy", choices=["fcfs", "fair"], default="fcfs",
                    help="prefix: the scheduling policy of both sides (fcfs: the recorded tables; fair: what a "
                         "server with a tenants file runs, where the default long-prefill cap applies)")
    ap.add_argument("--long-prefill-token-threshold", type=int, default=None,
                    help="both parts: the scheduler's long_prefill_token_threshold (unset: its default rule, "
                         "128 under fair on the CPU while two tenants are active; 0: off)")
    ap.add_argument("--tenants-fair", type=int, default=10)
    ap.add_argument("--fair-prompt", type=int, default=64)
    ap.add_argument("--fair-new-tokens", type=int, default=32)
    ap.add_argument("--overload-divisor", type=float, default=12.0,
                    help="light rate = capacity / this (9 light below capacity, +heavy 10x over it)")
    ap.add_argument("--capacity", type=float, default=None,
                    help="fairness: requests/s to size the load by, instead of measuring a burst (the same load "
                         "for runs to compare on a machine whose speed moves)")
    ap.add_argument("--duration", type=float, default=60.0, help="fairness: seconds of arrivals")
    ap.add_argument("--backlog", type=int, default=6, help="fairness: queued requests per light tenant")
    ap.add_argument("--fair-cache", choices=["on", "off"], default="on",
                    help="fairness: prefix caching (the engine's default: on; prompts are unique, so it "
                         "only makes a preempted sequence's recompute find its own blocks)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer directory for a model that ships none (e.g. bench/models/llama-8b with "
                         "bench/models/smollm2-135m: prompts are token ids, text is never read)")
    ap.add_argument("--out", default="bench/out/prefix_fairness.json")
    args = ap.parse_args()
    base = load_base(args.model, resolve_dtype(args.dtype, args.device), load_format=args.load_format,
                     tokenizer=args.tokenizer, init_device=args.device)
    res = {"args": vars(args), "dtype": str(base.dtype), "machine": platform.platform(),
           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="nlora-bench-") as scratch:
        if args.only in (None, "prefix"):
            res["prefix"] = bench_prefix(args, base, Path(scratch) / "store")
        if args.only in (None, "fairness"):
            res["fairness"] = bench_fairness(args, base, Path(scratch) / "store-fair")
    print_table(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
