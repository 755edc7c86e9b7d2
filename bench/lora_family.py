"""Compress-then-Serve on our engine: 1,000 LoRAs as one family vs as LoRAs vs the base (issue 21).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/lora_family.py [--members 1000] [--ranks 16 32 64]

Members: the real LoRAs of the zoo (bench/lora_zoo.py: 28 trained with PEFT on CPU, one per
dataset of bench/lora_zoo_data.py; trained on first use, then cached), plus synthetic members up
to --members. Synthetic member k is real LoRA k mod 28 with a full-rank Gaussian perturbation,
A' = A + 0.3·(‖A‖/‖G‖)·G and B' = B + 0.3·(‖B‖/‖H‖)·H per site (G, H i.i.d. normal, seeded per
member): its directions leave the real LoRAs' span, so the shared basis must spend rank on it.

1. Compression at each R (what ``adapters compress --no-eval`` runs, the members read once for
   every R; one thread, float64, 2 HOOI sweeps): compression time, memory per adapter before
   (A, B fp32) and after (N: sites·R² fp32), relative reconstruction error.
2. Quality of the real members against PEFT's own outputs of the uncompressed LoRAs
   (quality.py): --held prompts × --eval-tokens greedy tokens each, teacher-forced. The smallest
   R at which every real member passes the gate (agreement ≥ 95%, mean KL ≤ 0.05).
3. Serving throughput in one engine (native, CPU, fp32), sides interleaved in --rounds rounds of
   --waves waves of --concurrency requests (fresh random prompts everywhere, so the prefix cache
   never helps): the base; the family at the gated R (every member's N resident, one
   FamilyPool); the same members as plain LoRAs in a LoraPool of max_loras = --concurrency slots
   (what a server needs so every running sequence can hold its own LoRA; LRU eviction, an
   evicted LoRA re-read from the store on its next request). Each request uses a different
   member, drawn without replacement from all --members (the LoRA and family sides the same ones).

Prints tables and writes bench/out/lora_family.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_family_quality  # noqa: E402  (bench/ is not a package)
import lora_zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_members(out: Path, real: list[Path], total: int) -> list[Path]:
    """The real LoRAs copied, then synthetic perturbed members up to ``total`` (see the module doc)."""
    out.mkdir(parents=True)
    dirs = []
    for d in real[:total]:
        shutil.copytree(d, out / d.name)
        dirs.append(out / d.name)
    for k in range(len(dirs), total):
        src = real[k % len(real)]
        gen = torch.Generator().manual_seed(1000 + k)
        tensors = {}
        for key, t in load_file(str(src / "adapter_model.safetensors")).items():
            noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            tensors[key] = t + 0.3 * (t.norm() / noise.norm()) * noise
        (out / f"syn{k:04d}").mkdir()
        shutil.copy(src / "adapter_config.json", out / f"syn{k:04d}" / "adapter_config.json")
        save_file(tensors, str(out / f"syn{k:04d}" / "adapter_model.safetensors"))
        dirs.append(out / f"syn{k:04d}")
    return dirs


def read_members(dirs: list[Path]) -> dict:
    """Every member read as the server reads it (``adapters compress`` reads them the same way)."""
    from nlora_serve.adapters.loader import read_adapter
    from nlora_serve.models import load_base

    base = load_base("default", torch.float32)
    return {d.name: read_adapter(d, base) for d in dirs}


def compress_at(adapters: dict, rank: int, out: Path) -> dict:
    """What ``adapters compress --rank R --no-eval`` does (the same two calls), on adapters read once
    for every R: compression time, bytes, per-member mean relative error; the family written to ``out``."""
    from nlora_serve.adapters.compress.build import compress_adapters, write_family

    start = time.perf_counter()
    family = compress_adapters(adapters, rank, iters=2, device="cpu")
    write_family(out, family)
    return {"compress_seconds": family.seconds, "wall_seconds": time.perf_counter() - start,
            "member_bytes": family.member_bytes(), "lora_bytes": max(family.source_bytes.values()),
            "factor_bytes": family.factors.nbytes,
            "rel_error": {n: statistics.mean(e.values()) for n, e in family.errors.items()}}


def summarise(rank: int, rep: dict, quality: dict, real: list[str]) -> dict:
    """One row of the compression table."""
    err = rep.pop("rel_error")
    syn = [e for n, e in err.items() if n not in real]
    q = [quality[n] for n in real]
    return {"rank": rank, **rep, "rel_error_real": statistics.mean(err[n] for n in real),
            "rel_error_synthetic": statistics.mean(syn) if syn else None,
            "agreement_mean": statistics.mean(x["agreement"] for x in q),
            "agreement_min": min(x["agreement"] for x in q), "kl_mean": statistics.mean(x["kl"] for x in q),
            "kl_max": max(x["kl"] for x in q), "passing": sum(x["passes"] for x in q), "measured": len(q),
            "positions": q[0]["positions"], "per_member": quality}


def make_engine(store: Path, concurrency: int, prompt_len: int, new_tokens: int, rank: int):
    from nlora_serve.adapters.runtime.manager import AdapterLimits
    from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.models import load_base

    base = load_base("default", torch.float32)
    blocks = -(-(prompt_len + new_tokens) // 16) * concurrency + 16
    config = EngineConfig(adapter_dir=str(store), adapter_limits=AdapterLimits(max_loras=concurrency,
                                                                               max_rank=max(64, rank)),
                          scheduler=SchedulerConfig(max_num_seqs=concurrency, max_num_batched_tokens=256,
                                                    max_model_len=prompt_len + new_tokens),
                          cache=CacheConfig(block_size=16, num_blocks=blocks), device="cpu")
    return LLMEngine(config, base)


def throughput(args, members: list[Path], family: Path, rank: int, scratch: Path) -> dict:
    """Base, family and LoRA sides interleaved in one engine (see the module doc)."""
    from nlora_serve.engine.sample.sampling import SamplingParams

    gen = torch.Generator().manual_seed(0)
    per_side = args.rounds * args.waves * args.concurrency
    picks = torch.randperm(len(members), generator=gen)[:per_side].tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    sides = ("base", "family", "lora")
    out: dict = {s: [] for s in sides}
    with make_engine(scratch / "store", args.concurrency, args.prompt_len, args.new_tokens, rank) as engine:
        start = time.perf_counter()
        for d in members:
            engine.adapters.register_dir(f"fam-{d.name}", family / d.name)
            engine.adapters.register_dir(f"lora-{d.name}", d)
        out["register_seconds"] = time.perf_counter() - start
        warm = torch.randint(100, 49000, (3, args.prompt_len), generator=gen).tolist()
        engine.generate(warm, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                        [None, f"fam-{members[0].name}", f"lora-{members[0].name}"])
        res = engine.adapters.residency
        for rnd in range(args.rounds):
            for side in sides[rnd % 3:] + sides[:rnd % 3]:  # rotate the order: no side always first
                loads, load_s = res.cold_loads, res.cold_load_seconds
                tokens, seconds = 0, 0.0
                for wave in range(args.waves):
                    at = (rnd * args.waves + wave) * args.concurrency
                    names = [None if side == "base" else f"{'fam' if side == 'family' else 'lora'}-{members[i].name}"
                             for i in picks[at:at + args.concurrency]]
                    prompts = torch.randint(100, 49000, (args.concurrency, args.prompt_len), generator=gen).tolist()
                    t0 = time.perf_counter()
                    outs = engine.generate(prompts, params, names)
                    seconds += time.perf_counter() - t0
                    tokens += sum(len(o.token_ids) for o in outs)
                out[side].append({"tok_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                                  "cold_loads": res.cold_loads - loads, "cold_load_seconds": res.cold_load_seconds - load_s})
                print(f"round {rnd} {side:<7} {tokens / seconds:8.1f} tok/s", flush=True)
    for side in sides:
        out[f"{side}_median"] = statistics.median(r["tok_per_s"] for r in out[side])
    for side in ("family", "lora"):
        out[f"{side}_vs_base"] = statistics.median(f["tok_per_s"] / b["tok_per_s"] for f, b in zip(out[side], out["base"]))
    return out


def render(results: dict) -> str:
    """The RESULTS.md tables (markdown) from a results dict."""
    lines = ["| R | compress (wall) | bytes / member (N fp32) | as a LoRA (A, B fp32) | ratio | factors once | "
             "mean rel. err real / synthetic | agreement mean / min | KL mean / max | real members passing |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["compression"]:
        lines.append(f"| {r['rank']} | {r['compress_seconds']:.0f} s ({r['wall_seconds']:.0f} s) | {r['member_bytes']:,} | "
                     f"{r['lora_bytes']:,} | {r['lora_bytes'] / r['member_bytes']:.1f}x | {r['factor_bytes'] / 1e6:.1f} MB | "
                     f"{r['rel_error_real']:.3f} / {r['rel_error_synthetic'] or 0:.3f} | {100 * r['agreement_mean']:.1f} / "
                     f"{100 * r['agreement_min']:.1f} % | {r['kl_mean']:.4f} / {r['kl_max']:.4f} | "
                     f"{r['passing']} / {r['measured']} ({r['positions']} positions each) |")
    t = results.get("throughput") or {}
    if t:
        lines += ["", "| round | base tok/s | family tok/s (x base) | LoRA tok/s (x base) | LoRA cold loads (s) |",
                  "|---|---|---|---|---|"]
        for i, (b, f, lo) in enumerate(zip(t["base"], t["family"], t["lora"])):
            lines.append(f"| {i} | {b['tok_per_s']:.1f} | {f['tok_per_s']:.1f} ({f['tok_per_s'] / b['tok_per_s']:.2f}) | "
                         f"{lo['tok_per_s']:.1f} ({lo['tok_per_s'] / b['tok_per_s']:.2f}) | "
                         f"{lo['cold_loads']} ({lo['cold_load_seconds']:.1f}) |")
        lines.append(f"| median | {t['base_median']:.1f} | {t['family_median']:.1f} ({t['family_vs_base']:.2f}) | "
                     f"{t['lora_median']:.1f} ({t['lora_vs_base']:.2f}) | |")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--real", type=int, default=None, help="use (and train) only the first N real LoRAs (default: all 28)")
    p.add_argument("--lora-dir", default=None,
                   help="take the real LoRAs from this folder of PEFT LoRA folders instead of the zoo "
                        "(e.g. tests/data/trained_loras for a quick check)")
    p.add_argument("--zoo-steps", type=int, default=32, help="training steps of the zoo LoRAs (bench/lora_zoo.py)")
    p.add_argument("--held", type=int, default=8, help="held prompts in the quality check (≤ 8)")
    p.add_argument("--eval-tokens", type=int, default=32, help="greedy tokens per held prompt")
    p.add_argument("--concurrency", type=int, default=32, help="requests per wave = max_num_seqs = max_loras")
    p.add_argument("--waves", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (compression always runs on one)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "lora_family.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.lora_dir:
        real_dirs, manifest = sorted(d for d in Path(args.lora_dir).iterdir() if d.is_dir()), {"lora_dir": args.lora_dir}
    else:
        real_dirs, manifest = lora_zoo.ensure_zoo(steps=args.zoo_steps, names=lora_zoo.lora_zoo_data.NAMES[: args.real])
    real_dirs = real_dirs[: args.real]
    results: dict = {"args": vars(args), "zoo": manifest, "compression": [], "throughput": {}}
    with tempfile.TemporaryDirectory(prefix="lora-family-") as scratch:
        scratch = Path(scratch)
        t0 = time.perf_counter()
        members = make_members(scratch / "members", real_dirs, args.members)
        results["make_members_seconds"] = time.perf_counter() - t0
        real = [d.name for d in real_dirs]
        checker = lora_family_quality.QualityCheck(real_dirs, args.held, args.eval_tokens)
        gated = None
        t0 = time.perf_counter()
        adapters = read_members(members)
        results["read_seconds"] = time.perf_counter() - t0
        for rank in args.ranks:
            rep = compress_at(adapters, rank, scratch / f"fam{rank}" / "family")
            row = summarise(rank, rep, checker.measure(scratch / f"fam{rank}" / "family"), real)
            results["compression"].append(row)
            print(f"R={rank}: compress {row['compress_seconds']:.1f} s (wall {row['wall_seconds']:.1f} s), "
                  f"{row['member_bytes']} B/member vs {row['lora_bytes']} B/LoRA, err real {row['rel_error_real']:.3f} "
                  f"syn {row['rel_error_synthetic'] or 0:.3f}, agree mean {100 * row['agreement_mean']:.1f}% min "
                  f"{100 * row['agreement_min']:.1f}%, KL mean {row['kl_mean']:.4f} max {row['kl_max']:.4f}, "
                  f"{row['passing']}/{row['measured']} pass", flush=True)
            if gated is None and row["passing"] == row["measured"]:
                gated = rank
        del adapters
        results["gated_rank"] = gated
        results["quality_seconds"] = checker.seconds
        print(f"smallest R passing the gate for every real member: {gated}")
        if not args.skip_throughput:
            rank = gated or max(args.ranks)
            results["throughput"] = throughput(args, members, scratch / f"fam{rank}" / "family", rank, scratch)
            results["throughput"]["rank"] = rank
            t = results["throughput"]
            print(f"median tok/s: base {t['base_median']:.1f}, family R={rank} {t['family_median']:.1f} "
                  f"({t['family_vs_base']:.2f}x base), LoRA {t['lora_median']:.1f} ({t['lora_vs_base']:.2f}x base)")
    results["total_seconds"] = time.perf_counter() - t_start
    print(render(results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out} ({results['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
