"""The prefix cache shared by tenants: one server-wide LRU against fair eviction (engine/scheduling/cache_shares.py).

(1) ``engine``: a light tenant repeats one long system prompt (``--prefix-tokens`` + a short unique
question, one request after another) while a heavy tenant streams distinct long prompts
(``--heavy-inflight`` at a time), both under ``--scheduling-policy fair`` and their own cache salt
(keys configured), in a KV cache too small for both (``--num-blocks``). The same load twice in one
run, eviction by one LRU (fcfs's, forced here) and by tenant shares; per arm: the light tenant's hit
rate (cached / prompt tokens) and TTFT p50 / p90, the heavy tenant's requests done.
(2) ``alloc``: the block manager alone, no model: tenants in turn admit, publish and free prompts of
distinct blocks in a pool they overfill, so every block taken evicts one; host CPU time per block
taken (µs), one LRU against tenant shares, for 1, 8 and 64 tenants.

    PYTHONPATH=. .venv/bin/python bench/cache_share.py                  # both
    PYTHONPATH=. .venv/bin/python bench/cache_share.py --only alloc

Prints tables and writes JSON (default bench/out/cache_share.json). Times are on whatever machine
runs it: compare the arms, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from nlora_serve.engine import core as core_module
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.scheduling.prefix_cache import PrefixCachingBlockManager
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.models import load_base, resolve_dtype


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else float("nan")


async def one(engine: LLMEngine, prompt: list[int], params: SamplingParams, tenant: str) -> tuple[float, int]:
    """Send one request and stream it to the end; (TTFT in seconds, cached prompt tokens)."""
    sent, ttft, cached = time.perf_counter(), None, 0
    async for out in engine.add_request(prompt, params, tenant=tenant, cache_salt=f"tenant:{tenant}"):
        if out.token_ids and ttft is None:
            ttft = time.perf_counter() - sent
        if out.finished:
            cached = out.cached_tokens
    return ttft, cached


async def load(engine: LLMEngine, args, vocab: int) -> dict:
    rng = random.Random(1)
    system = [rng.randrange(100, vocab) for _ in range(args.prefix_tokens)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    stop = time.perf_counter() + args.duration
    light: list[tuple[float, int, int]] = []  # (TTFT, cached, prompt tokens)
    heavy_done = [0]

    async def light_loop() -> None:
        while time.perf_counter() < stop:
            prompt = system + [rng.randrange(100, vocab) for _ in range(args.suffix_tokens)]
            ttft, cached = await one(engine, prompt, params, "light")
            light.append((ttft, cached, len(prompt)))
            await asyncio.sleep(args.light_gap)

    async def heavy_loop(lane: int) -> None:
        hrng = random.Random(100 + lane)
        while time.perf_counter() < stop:
            prompt = [hrng.randrange(100, vocab) for _ in range(args.prefix_tokens + args.suffix_tokens)]
            await one(engine, prompt, params, "heavy")
            heavy_done[0] += 1

    await asyncio.gather(light_loop(), *(heavy_loop(i) for i in range(args.heavy_inflight)))
    ttfts = [t for t, _, _ in light[1:]]  # the first light request finds nothing cached either way
    return {"light_requests": len(light), "light_hit_rate": sum(c for _, c, _ in light[1:]) / sum(n for *_, n in light[1:]),
            "light_ttft_p50_s": pct(ttfts, 0.5), "light_ttft_p90_s": pct(ttfts, 0.9), "heavy_requests": heavy_done[0],
            "light_cached_tokens": [c for _, c, _ in light]}


def parse_thresholds(spec: str) -> dict[str, int | None]:
    """``--thresholds`` ("default,0"): arm suffix -> long_prefill_token_threshold (``default``: None, the
    scheduler's own rule; N: that value, 0 off)."""
    out: dict[str, int | None] = {}
    for item in spec.split(","):
        item = item.strip()
        if item == "default":
            out["default"] = None
        elif item.isdigit():
            out[f"t{int(item)}"] = int(item)
        else:
            raise SystemExit(f"--thresholds: {item!r} is neither 'default' nor a non-negative integer")
    return out


def bench_engine(args) -> dict:
    """Per arm (eviction x threshold, the thresholds of one eviction run back to back, their order
    reversed for the second eviction): the light tenant's hit rate and TTFT, the heavy tenant's requests
    done, the 1-minute load average at the end."""
    base = load_base(args.model, resolve_dtype(args.dtype, args.device), load_format=args.load_format,
                     init_device=args.device)
    max_len = args.prefix_tokens + args.suffix_tokens + args.new_tokens
    thresholds = parse_thresholds(args.thresholds)
    single = list(thresholds) == ["default"]
    result = {}
    real = core_module.PrefixCachingBlockManager
    for i, eviction in enumerate(("lru", "fair")):
        order = list(thresholds.items())
        for suffix, threshold in (order if i % 2 == 0 else order[::-1]):
            arm = eviction if single else f"{eviction}/{suffix}"
            if eviction == "lru":  # the fair scheduler with fcfs's eviction: one LRU over every tenant's blocks
                core_module.PrefixCachingBlockManager = lambda n, size, tenant_weights: real(n, size)
            config = EngineConfig(model=args.model, dtype=base.dtype, device=args.device, load_format=args.load_format,
                                  scheduler=SchedulerConfig(max_num_seqs=args.heavy_inflight + 1,
                                                            max_num_batched_tokens=args.budget, max_model_len=max_len,
                                                            policy="fair", long_prefill_token_threshold=threshold),
                                  cache=CacheConfig(block_size=16, num_blocks=args.num_blocks))
            try:
                with LLMEngine(config, base) as engine:
                    result[arm] = asyncio.run(load(engine, args, base.spec.vocab_size))
            finally:
                core_module.PrefixCachingBlockManager = real
            result[arm]["load_average_1m"] = os.getloadavg()[0]
            print(f"[{time.strftime('%H:%M:%S')}] {arm}: {json.dumps(result[arm])}", flush=True)
    return result


def bench_alloc(tenants: int, weights: dict | None, num_blocks: int = 4096, prompt_blocks: int = 64,
                rounds: int = 400) -> float:
    """Host CPU µs per block taken, every take an eviction once the pool is full (see the module docstring)."""
    pool = PrefixCachingBlockManager(num_blocks, 16, tenant_weights=weights)
    rng = random.Random(0)
    taken, spent = 0, 0.0
    for r in range(rounds):
        tenant = f"t{r % tenants}"
        ids = [rng.randrange(1, 30000) for _ in range(prompt_blocks * 16 + 1)]
        seq = Sequence(str(r), r, ids, len(ids), SamplingParams(), tenant=tenant, cache_salt=f"tenant:{tenant}")
        start = time.thread_time()
        hit = pool.match(seq)
        assert pool.admit(seq, hit, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
        pool.commit(seq)
        pool.free(seq.block_table)
        if r >= rounds // 4:  # after the pool filled up
            spent += time.thread_time() - start
            taken += prompt_blocks + 1
    return spent / taken * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["engine", "alloc"], default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--prefix-tokens", type=int, default=1024, help="the light tenant's system prompt; heavy prompts as long")
    ap.add_argument("--suffix-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--heavy-inflight", type=int, default=2, help="heavy requests in flight at any time")
    ap.add_argument("--light-gap", type=float, default=3.0, help="seconds between two light requests")
    ap.add_argument("--num-blocks", type=int, default=256, help="KV blocks of 16 tokens (256: 4,096 tokens)")
    ap.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of load per arm")
    ap.add_argument("--thresholds", default="default",
                    help="long_prefill_token_threshold per arm, comma-separated: 'default' (unset: 128 under fair "
                         "on the CPU while two tenants are active) or N (0: off); more than one runs each eviction "
                         "once per value, side by side")
    ap.add_argument("--out", default="bench/out/cache_share.json")
    args = ap.parse_args()
    res = {"args": vars(args), "machine": platform.platform(), "threads": torch.get_num_threads()}
    if args.only in (None, "alloc"):
        res["alloc_us_per_block"] = {f"{n} tenants": {"lru": bench_alloc(n, None), "fair": bench_alloc(n, {})}
                                     for n in (1, 8, 64)}
        print("allocator, host µs per block taken (each an eviction)   one LRU   tenant shares")
        for k, v in res["alloc_us_per_block"].items():
            print(f"{k:>12}                                          {v['lru']:7.2f}   {v['fair']:7.2f}")
    if args.only in (None, "engine"):
        res["engine"] = e = bench_engine(args)
        arms = list(e)
        print("light tenant against a heavy one   " + "".join(f"{a:>14}" for a in arms))
        print("light hit rate (cached / prompt)   " + "".join(f"{e[a]['light_hit_rate']:14.1%}" for a in arms))
        for q in ("p50", "p90"):
            print(f"light TTFT {q} (s)                 " + "".join(f"{e[a][f'light_ttft_{q}_s']:14.3f}" for a in arms))
        print("light / heavy requests done        " + "".join(f"{e[a]['light_requests']:>9d} / {e[a]['heavy_requests']:<2d}"
                                                              for a in arms))
        print("load average 1-min at arm's end    " + "".join(f"{e[a]['load_average_1m']:14.1f}" for a in arms))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
