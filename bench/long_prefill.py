"""A light tenant's TTFT and TPOT while a heavy tenant streams long prompts, with
``--long-prefill-token-threshold`` off and on, side by side in one run (our engine, in-process).

The hostile load of the hostile-tenant pass: tenant bob keeps ``--heavy-streams`` (2) requests of
``--heavy-prompt`` (1,850) unique tokens and max_tokens 1 in flight, below his fair number of
running slots, so ``--scheduling-policy fair`` never defers him; tenant carol sends one short
request at a time (``--light-prompt`` tokens, ``--light-new-tokens`` generated). Without the
threshold every step carries up to ``--budget`` tokens of bob's prefill, and carol's decodes wait
for it. Configurations: carol alone (the reference), threshold off, and each of ``--thresholds``
(or ``--configs``: ``off``, ``N`` (threshold N), ``aN`` (N with ``--long-prefill-token-threshold-adaptive``),
``bM`` (threshold off, ``--max-num-batched-tokens M``), ``NbM``; ``default`` (the flags left
unset: SchedulerConfig's own default for the policy)); ``--rounds`` rounds of ``--round-seconds`` each,
the configurations interleaved (order reversed every other round) so that a loaded, shared
machine's drift hits all of them alike.

    .venv/bin/python bench/long_prefill.py                          # about 10 minutes on 2 cores
    .venv/bin/python bench/long_prefill.py --thresholds 128,256,512 --rounds 2
    .venv/bin/python bench/long_prefill.py --configs off,64,128,256,a64,b512 --heavy-prompt 1218

Prints a table (carol's TTFT and TPOT p50 / p90 and her inter-token latency (ITL) p50 / p90 / p99 /
max in seconds, bob's requests and prefill tokens per second, all tokens computed per second, the
ratios off / on) and writes JSON (default bench/out/long_prefill.json).
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

from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.models import load_base, resolve_dtype


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def parse_config(spec: str, budget: int) -> dict:
    """``off`` / ``N`` / ``aN`` / ``bM`` / ``NbM`` / ``default`` -> SchedulerConfig fields (module docstring)."""
    if spec == "default":
        return {"max_num_batched_tokens": budget}
    threshold, _, b = spec.partition("b")
    adaptive = threshold.startswith("a")
    threshold = threshold.removeprefix("a")
    return {"long_prefill_token_threshold": 0 if threshold in ("", "off") else int(threshold),
            "long_prefill_token_threshold_adaptive": adaptive, "max_num_batched_tokens": int(b) if b else budget}


def make_engine(args, base, fields: dict) -> LLMEngine:
    max_len = max(args.heavy_prompt + 1, args.light_prompt + args.light_new_tokens)
    # bob's streams and carol's request, with room to spare: preemptions would measure something else
    blocks = 2 * (args.heavy_streams * -(-max_len // 16) + -(-max_len // 16))
    config = EngineConfig(model=args.model, dtype=base.dtype, device=args.device,
                          scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                                                    policy=args.policy, **fields),
                          cache=CacheConfig(block_size=16, num_blocks=blocks))
    return LLMEngine(config, base)


async def one_round(engine: LLMEngine, args, rng: random.Random, heavy: bool) -> dict:
    """``--round-seconds`` of the load; carol's per-request TTFT / TPOT and bob's completions."""
    vocab, stop = args.vocab, time.perf_counter() + args.round_seconds
    light = SamplingParams(max_tokens=args.light_new_tokens, min_tokens=args.light_new_tokens, temperature=0.0)
    heavy_params = SamplingParams(max_tokens=1, temperature=0.0)
    carol: list[dict] = []
    bob: list[float] = []

    async def carol_loop() -> None:
        while time.perf_counter() < stop:
            prompt = [rng.randrange(100, vocab) for _ in range(args.light_prompt)]
            sent, first, last, n, itl = time.perf_counter(), None, None, 0, []
            async for out in engine.add_request(prompt, light, tenant="carol"):
                if not out.token_ids:
                    continue
                now = time.perf_counter()
                n += len(out.token_ids)
                if first is None:
                    first = now
                else:  # a delivery of k tokens: k gaps of (now - last) / k
                    itl += [(now - last) / len(out.token_ids)] * len(out.token_ids)
                last = now
            carol.append({"ttft": first - sent, "tpot": (last - first) / max(1, n - 1), "itl": itl, "tokens": n})
            await asyncio.sleep(args.light_gap)

    async def bob_loop() -> None:
        while time.perf_counter() < stop:
            prompt = [rng.randrange(100, vocab) for _ in range(args.heavy_prompt)]
            sent = time.perf_counter()
            async for _ in engine.add_request(prompt, heavy_params, tenant="bob"):
                pass
            bob.append(time.perf_counter() - sent)

    start = time.perf_counter()
    await asyncio.gather(carol_loop(), *(bob_loop() for _ in range(args.heavy_streams if heavy else 0)))
    return {"carol": carol, "bob": bob, "wall_s": time.perf_counter() - start, "load_average_1m": os.getloadavg()[0]}


def summarize(rounds: list[dict], heavy_prompt: int, light_prompt: int) -> dict:
    carol = [r for rnd in rounds for r in rnd["carol"]]
    bob = [t for rnd in rounds for t in rnd["bob"]]
    wall = sum(rnd["wall_s"] for rnd in rounds)
    ttft, tpot = [r["ttft"] for r in carol], [r["tpot"] for r in carol]
    itl = [g for r in carol for g in r["itl"]]
    return {"carol_requests": len(carol), "ttft_p50_s": pct(ttft, 0.5), "ttft_p90_s": pct(ttft, 0.9),
            "tpot_p50_s": pct(tpot, 0.5), "tpot_p90_s": pct(tpot, 0.9), "itl_p50_s": pct(itl, 0.5),
            "itl_p90_s": pct(itl, 0.9), "itl_p99_s": pct(itl, 0.99), "itl_max_s": max(itl, default=float("nan")),
            "bob_requests": len(bob), "bob_latency_p50_s": pct(bob, 0.5),
            "bob_prefill_tokens_per_s": len(bob) * heavy_prompt / wall,
            # every token the engine computed for finished requests: prompts and outputs, both tenants
            "total_tokens_per_s": (len(bob) * (heavy_prompt + 1)
                                   + sum(light_prompt + r.get("tokens", 0) for r in carol)) / wall}


def print_table(res: dict) -> None:
    rows = res["configs"]
    print(f"\n{'config':>14} {'carol n':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} {'TPOT p90':>9} "
          f"{'ITL p50':>8} {'ITL p90':>8} {'ITL p99':>8} {'ITL max':>8} {'bob n':>6} {'bob lat p50':>11} "
          f"{'bob prefill tok/s':>17} {'total tok/s':>11}")
    for name, r in rows.items():
        print(f"{name:>14} {r['carol_requests']:>8} {r['ttft_p50_s']:>9.3f} {r['ttft_p90_s']:>9.3f} "
              f"{r['tpot_p50_s']:>9.3f} {r['tpot_p90_s']:>9.3f} {r['itl_p50_s']:>8.3f} {r['itl_p90_s']:>8.3f} "
              f"{r['itl_p99_s']:>8.3f} {r['itl_max_s']:>8.3f} {r['bob_requests']:>6} "
              f"{r['bob_latency_p50_s']:>11.2f} {r['bob_prefill_tokens_per_s']:>17.0f} {r['total_tokens_per_s']:>11.0f}")
    off = rows.get("threshold off")
    for name, r in rows.items():
        if off is not None and name != "carol alone" and r is not off:
            print(f"{name}: carol TTFT p50 off/on {off['ttft_p50_s'] / r['ttft_p50_s']:.2f}x, "
                  f"TPOT p50 off/on {off['tpot_p50_s'] / r['tpot_p50_s']:.2f}x, "
                  f"TPOT p90 off/on {off['tpot_p90_s'] / r['tpot_p90_s']:.2f}x, "
                  f"ITL p90 off/on {off['itl_p90_s'] / r['itl_p90_s']:.2f}x, "
                  f"ITL p99 off/on {off['itl_p99_s'] / r['itl_p99_s']:.2f}x; "
                  f"total tok/s on/off {r['total_tokens_per_s'] / off['total_tokens_per_s']:.2f}x, bob prefill tok/s on/off "
                  f"{r['bob_prefill_tokens_per_s'] / off['bob_prefill_tokens_per_s']:.2f}x, "
                  f"bob latency p50 on/off {r['bob_latency_p50_s'] / off['bob_latency_p50_s']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policy", choices=["fcfs", "fair"], default="fair")
    ap.add_argument("--thresholds", default="256,64", help="comma-separated thresholds to compare with off")
    ap.add_argument("--configs", default=None, help="comma-separated configurations instead of off + --thresholds: "
                                                     "off, N, aN (adaptive), bM (budget M), NbM, default")
    ap.add_argument("--budget", type=int, default=2048, help="--max-num-batched-tokens")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--heavy-prompt", type=int, default=1850)
    ap.add_argument("--heavy-streams", type=int, default=2)
    ap.add_argument("--light-prompt", type=int, default=64)
    ap.add_argument("--light-new-tokens", type=int, default=32)
    ap.add_argument("--light-gap", type=float, default=0.1, help="seconds carol waits between her requests")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-seconds", type=float, default=40.0)
    ap.add_argument("--out", default="bench/out/long_prefill.json")
    args = ap.parse_args()
    base = load_base(args.model, resolve_dtype(args.dtype, args.device), init_device=args.device)
    args.vocab = base.spec.vocab_size
    specs = args.configs.split(",") if args.configs else ["off", *args.thresholds.split(",")]
    names = {"off": "threshold off", "default": "default"}
    configs = {"carol alone": (parse_config("off", args.budget), False)}
    for spec in specs:
        name = names.get(spec) or ("adaptive " + spec[1:] if spec.startswith("a") else
                                   "budget " + spec[1:] if spec.startswith("b") else "threshold " + spec)
        configs[name] = (parse_config(spec, args.budget), True)
    engines = {name: make_engine(args, base, fields) for name, (fields, _) in configs.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    try:
        for name, engine in engines.items():  # first steps (kernel set-up, allocations) off the clock
            engine.generate([[5] * args.heavy_prompt, [7] * args.light_prompt], SamplingParams(max_tokens=1, temperature=0.0))
        rng = random.Random(0)
        for k in range(args.rounds):
            order = list(configs) if k % 2 == 0 else list(reversed(configs))
            for name in order:
                rnd = asyncio.run(one_round(engines[name], args, rng, heavy=configs[name][1]))
                rounds[name].append(rnd)
                s = summarize([rnd], args.heavy_prompt, args.light_prompt)
                print(f"[{time.strftime('%H:%M:%S')}] round {k} {name}: {json.dumps(s)}", flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    res = {"args": vars(args), "dtype": str(base.dtype), "machine": platform.platform(),
           "threads": torch.get_num_threads(),
           "load_average": os.getloadavg(),
           "configs": {name: summarize(rs, args.heavy_prompt, args.light_prompt) for name, rs in rounds.items()},
           "rounds": rounds}
    print_table(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
