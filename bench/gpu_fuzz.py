"""A correctness fuzz of the native engine under the settings most likely to break it (the CUDA path).

Random rounds of requests run through one engine at a time, configured as it serves on a GPU:
async scheduling on, decode CUDA graphs (config "graphs") or piecewise prefill/mixed graphs too
("piecewise"), ``max_loras`` 1 (every LoRA request ending hands the one slot to another tenant; the
rest wait for it). Each round mixes base, tied IntTune (N only, ranks 8 and 16) and untied tenants
(LoRA rank 4 on every projection, LoRA rank 16 on attention only, NLoRA rank 8) in one batch, with
random prompt lengths (many over the step's token budget: chunked prefill over several steps),
prompts reusing an earlier one's prefix (prefix-cache hits), random ``max_tokens``, arrivals while
others decode, aborts (before the first token or after k tokens), a KV cache small enough to
preempt, and hot swaps of a tied tenant's N mid-round (N negated, or back: a version whose blocks
the prefix cache already holds).

Reference: transformers in float32 on the same random weights with the request's adapter version
folded in float64 (tests/engine/tiny_llama.py), one teacher-forced forward over prompt + the
engine's tokens. Each greedy token must be the reference's top token, or within ``--tie-margin``
of it (a near-tie the arithmetic may flip, as gpu_engine_check's "decided" steps; 1e-3 in fp32,
the engines differing by ~1e-6 relative): every token is checked, also after a tolerated tie. A
finished request must have exactly ``max_tokens`` tokens, and after each round no KV block, running
or waiting request, or adapter pin may remain. Results go to ``--out`` (after every round); exit
status 1 on any mismatch or leak.

    python bench/gpu_fuzz.py --device cuda --seconds 60                        # a GPU (gpu_check.sh extra)
    TRITON_INTERPRET=1 python bench/gpu_fuzz.py --device cpu --seconds 30      # the same path, here
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engine"))  # tiny_llama: the random model, PEFT folders, merged refs

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from tiny_llama import make_tiny_llama, merged, random_factors, write_peft  # noqa: E402

from nlora_serve.adapters.limits import AdapterLimits  # noqa: E402
from nlora_serve.engine.api import EngineError, RequestAborted  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402

TOKENIZER = ROOT / "bench" / "models" / "smollm2-135m"
ATTENTION = ("q_proj", "v_proj", "o_proj")
# name -> (rank, random_factors kind, modules or None for all); alpha = 2 * rank (s = 2)
TENANTS = {"tied8": (8, dict(tied=True, with_n=True, seed=1, n_scale=1.0), None),
           "tied16": (16, dict(tied=True, with_n=True, seed=2, n_scale=1.0), None),
           "lora4": (4, dict(with_n=False, seed=3), None),
           "lora16attn": (16, dict(with_n=False, seed=4), ATTENTION),
           "nlora8": (8, dict(with_n=True, seed=5), None)}
TIED = [name for name, (_, kind, _) in TENANTS.items() if kind.get("tied")]
# EngineConfig fields per configuration (all on the Triton path; graphs are CUDA's, eager on the CPU)
CONFIGS = {"graphs": dict(async_scheduling=True, enforce_eager=False, piecewise_graphs=False, max_loras=1),
           "piecewise": dict(async_scheduling=True, enforce_eager=False, piecewise_graphs=True, max_loras=1),
           "sync": dict(async_scheduling=False, enforce_eager=False, piecewise_graphs=False, max_loras=2)}
# model shapes: "tiny" (CI, the interpreter), "small" (the default model's widths, 2 layers: a GPU)
SHAPES = {"tiny": dict(vocab_size=4096, hidden=96, heads=6, kv_heads=2, head_dim=32, intermediate=128, layers=2),
          "small": dict(vocab_size=49152, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, layers=2)}
# sizes per shape: running sequences, step token budget, max_model_len, KV blocks of 16, longest prompt, most new tokens
SIZES = {"tiny": dict(seqs=6, budget=32, max_len=96, blocks=9, prompt=70, new=6, jobs=6),
         "small": dict(seqs=16, budget=256, max_len=1024, blocks=96, prompt=700, new=24, jobs=24)}


@dataclass
class Job:
    """One request of a round: its arrival (after ``arrive_at`` tokens of the round have come back,
    or when nothing else runs) and its abort (after ``abort_after`` tokens; 0: before any)."""

    rid: str
    tenant: str | None
    prompt: list[int]
    max_tokens: int
    arrive_at: int
    abort_after: int | None


class World:
    """The random model, the tenants' folders and factors, and transformers' references on ``device``."""

    def __init__(self, scratch: Path, shape: str, device: str, layers: int | None = None):
        dims = SHAPES[shape] | ({"layers": layers} if layers else {})
        self.model = make_tiny_llama(scratch / "model", init_std=0.08, **dims).to(device)
        self.scratch, self.model_dir, self.vocab = scratch, scratch / "model", dims["vocab_size"]
        self.factors, self.folders, self.refs = {}, {}, {}
        scale = 0.3 * (96 / dims["hidden"]) ** 0.5  # LoRA factors moving the weights alike at either width
        for name, (rank, kind, modules) in TENANTS.items():
            f = random_factors(self.model, rank=rank, scale=scale, **kind)
            if modules is not None:
                f = {site: parts for site, parts in f.items() if site[1] in modules}
            self.factors[(name, 0)] = f
            if name in TIED:  # the swapped-in N: negated (exact in any dtype)
                self.factors[(name, 1)] = {s: {**p, "N": -p["N"]} for s, p in f.items()}
            self.folders[name] = write_peft(scratch / name, f, rank=rank, alpha=2.0 * rank)

    def reference(self, tenant: str | None, nset: int):
        if tenant is None:
            return self.model
        key = (tenant, nset)
        if key not in self.refs:
            rank = TENANTS[tenant][0]
            self.refs[key] = merged(self.model, self.factors[key], rank=rank, alpha=2.0 * rank)
        return self.refs[key]


def make_jobs(rng: random.Random, round_no: int, sizes: dict, vocab: int, history: list[list[int]]) -> list[Job]:
    """A round's requests: tenants, prompt lengths (short, around the budget, long), shared prefixes."""
    jobs, burst = [], rng.random() < 0.4  # a burst: all at once (the KV cache runs out: preemptions)
    for i in range(rng.randint(2, sizes["jobs"])):
        tenant = rng.choice([None, None, *TENANTS])
        kind = rng.random()
        length = (rng.randint(1, 8) if kind < 0.3 else rng.randint(sizes["budget"] - 4, sizes["budget"] + 20)
                  if kind < 0.5 else rng.randint(9, sizes["prompt"]))
        if history and rng.random() < 0.3:  # an earlier prompt's prefix (another tenant's, or its own)
            prefix = rng.choice(history)
            prompt = prefix[:rng.randint(1, len(prefix))] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))]
        else:
            prompt = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = prompt[:sizes["prompt"]]
        max_tokens = rng.randint(1, sizes["new"])
        abort = rng.randint(0, max_tokens - 1) if max_tokens > 1 and rng.random() < 0.2 else None
        arrive = 0 if i < 2 or burst else rng.randint(0, 3 * sizes["new"])
        jobs.append(Job(f"r{round_no}-{i}", tenant, prompt, max_tokens, arrive, abort))
        history.append(prompt)
    del history[:-32]
    return jobs


async def run_round(engine: LLMEngine, jobs: list[Job], swap: tuple[int, str, bytes] | None) -> tuple[dict, object]:
    """Submit ``jobs`` as they arrive, abort and swap as planned; returns ({rid: result}, the swap's
    new version or None)."""
    got, state = {}, {"tokens": 0, "running": 0, "swapped": None}

    async def arrive(at: int) -> None:
        while state["tokens"] < at and state["running"] > 0:
            await asyncio.sleep(0.001)

    async def one(job: Job) -> None:
        await arrive(job.arrive_at)
        state["running"] += 1
        try:
            params = SamplingParams(max_tokens=job.max_tokens, temperature=0.0, ignore_eos=True)
            stream = engine.add_request(job.prompt, params, request_id=job.rid, adapter=job.tenant)
            tokens, last, aborted = [], None, False
            if job.abort_after == 0:
                engine.abort(job.rid)
                aborted = True
            async for out in stream:
                tokens += out.token_ids
                state["tokens"] += len(out.token_ids)
                last = out
                if not aborted and job.abort_after is not None and len(tokens) >= job.abort_after:
                    engine.abort(job.rid)
                    aborted = True
            got[job.rid] = {"tokens": tokens, "finish": last.finish_reason, "version": last.adapter_version,
                            "cached": last.cached_tokens, "aborted": aborted}
        except (EngineError, RequestAborted) as exc:  # the engine failed it (or aborted it itself)
            got[job.rid] = {"tokens": [], "finish": "error", "version": None, "cached": 0, "aborted": False,
                            "error": f"{type(exc).__name__}: {exc}"}
        finally:
            state["running"] -= 1

    async def swapper(at: int, name: str, payload: bytes) -> None:
        await arrive(at)
        state["swapped"] = await asyncio.to_thread(engine.adapters.swap, name, payload)

    tasks = [one(j) for j in jobs] + ([swapper(*swap)] if swap else [])
    await asyncio.gather(*tasks)
    return got, state["swapped"]


@torch.no_grad()
def check(world: World, job: Job, result: dict, nset: int, tie: float) -> dict | None:
    """None when the request's tokens are the reference's greedy ones (up to near-ties) and its
    length and finish fit; else what differs, with the first differing position."""
    if "error" in result:
        return {"what": "error", "got": result["error"]}
    tokens = result["tokens"]
    done = "abort" if result["aborted"] else "length"
    short = done == "length" and (result["finish"], len(tokens)) != ("length", job.max_tokens)
    if len(tokens) > job.max_tokens or short:
        return {"what": "length/finish", "got": [result["finish"], len(tokens)], "want": [done, job.max_tokens]}
    if result["finish"] not in ("length", "abort"):
        return {"what": "finish", "got": result["finish"]}
    if not tokens:
        return None
    model = world.reference(job.tenant, nset)
    ids = torch.tensor([job.prompt + tokens[:-1]], device=model.device)
    logits = model(ids).logits[0, len(job.prompt) - 1:].double().cpu()
    top = logits.max(dim=1).values
    ours = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    bad = (ours < top - tie).nonzero().flatten().tolist()
    if not bad:
        return None
    p = bad[0]
    return {"what": "tokens", "first_differing_position": p, "bad_positions": len(bad), "got": tokens[p],
            "want": int(logits[p].argmax()), "logit_gap": float(top[p] - ours[p]), "tokens": tokens}


def leftovers(engine: LLMEngine, seconds: float = 5.0) -> dict:
    """What a round left behind (waits up to ``seconds`` for the step thread to settle): {} if nothing."""
    deadline = time.monotonic() + seconds
    while True:
        stats = engine.stats()
        left = {k: stats[k] for k in ("running", "waiting", "kv_blocks_used") if stats[k]}
        left.update({f"pins:{v.name}": v.refcount for v in engine.adapters.versions() if v.refcount})
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def fuzz_config(world: World, name: str, args, sizes: dict, rng: random.Random, until: float, report) -> None:
    """Rounds on one engine of configuration ``name`` until ``until`` (time.monotonic) or
    ``args.rounds`` rounds; at least one."""
    fields = dict(CONFIGS[name])
    limits = AdapterLimits(max_loras=fields.pop("max_loras"))  # the default max_rank: gpu_check's other kernels
    config = EngineConfig(model=str(world.model_dir), tokenizer=str(TOKENIZER), dtype=getattr(torch, args.dtype),
                          device=args.device, kernel_backend=args.kernel_backend,
                          adapter_dir=str(world.scratch / f"store-{name}"),
                          adapter_limits=limits, **fields,
                          scheduler=SchedulerConfig(max_num_seqs=sizes["seqs"], max_num_batched_tokens=sizes["budget"],
                                                    max_model_len=sizes["max_len"]),
                          cache=CacheConfig(block_size=16, num_blocks=sizes["blocks"]))
    history: list[list[int]] = []
    began = time.monotonic()
    with LLMEngine(config) as engine:
        print(f"{name}: engine started in {time.monotonic() - began:.1f} s", flush=True)
        nsets = {t: {} for t in TENANTS}  # tenant -> {version: which N set}
        n_files = {}
        for tenant, folder in world.folders.items():
            version = engine.adapters.register_dir(tenant, folder)
            nsets[tenant][version.version] = 0
            if tenant in TIED:  # the stored N (compact form): negate it to swap to N set 1
                n_files[tenant] = safetensors.torch.load_file(str(version.path / "adapter_model.safetensors"))
        current = {t: 0 for t in TIED}
        round_no = 0
        while round_no == 0 or (time.monotonic() < until and round_no < (args.rounds or round_no + 1)):
            jobs = make_jobs(rng, round_no, sizes, world.vocab, history)
            swap = None
            if rng.random() < 0.5:
                tenant = rng.choice(TIED)
                sign = -1.0 if current[tenant] == 0 else 1.0
                payload = safetensors.torch.save({k: (sign * t).contiguous() for k, t in n_files[tenant].items()})
                swap = (rng.randint(0, 2 * sizes["new"]), tenant, payload)
            start = time.monotonic()
            try:
                got, swapped = asyncio.run(asyncio.wait_for(run_round(engine, jobs, swap), args.round_timeout))
            except TimeoutError:  # a request never finished: report what is left and stop here
                stall = [{"job": asdict(job) | {"prompt_len": len(job.prompt)}, "what": "stall",
                          "got": f"not finished after {args.round_timeout} s"} for job in jobs]
                report(name, round_no, jobs, {}, stall, leftovers(engine, 0.0), swap is not None,
                       time.monotonic() - start, engine.stats())
                return
            if swapped is not None:
                current[swap[1]] = 1 - current[swap[1]]
                nsets[swap[1]][swapped.version] = current[swap[1]]
            mismatches = []
            for job in jobs:
                result = got[job.rid]
                nset = nsets[job.tenant].get(result["version"]) if job.tenant and "error" not in result else 0
                problem = ({"what": "unknown version", "got": result["version"]} if nset is None
                           else check(world, job, result, nset, args.tie_margin))
                if problem:
                    mismatches.append({"job": asdict(job) | {"prompt_len": len(job.prompt)}, "result": result,
                                       **problem})
            left = leftovers(engine)
            report(name, round_no, jobs, got, mismatches, left, swap is not None, time.monotonic() - start,
                   engine.stats())
            round_no += 1


def fuzz(world: World, args, out: Path, start: float) -> dict:
    """Every configuration of ``args.configs`` in turn, sharing the time left until ``start`` +
    ``args.seconds``; the summary is rewritten to ``out`` after every round and returned."""
    rng = random.Random(args.seed)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": [], "requests": 0, "tokens": 0,
               "aborted": 0, "swaps": 0, "tenants": [], "mismatches": 0, "leaks": 0, "pass": True}

    def report(name, round_no, jobs, got, mismatches, left, swapped, seconds, stats):
        results = got.values()
        row = {"config": name, "round": round_no, "requests": len(jobs),
               "tokens": sum(len(g["tokens"]) for g in results),
               "aborted": sum(g["aborted"] for g in results), "cached_tokens": sum(g["cached"] for g in results),
               "tenants": sorted({j.tenant or "base" for j in jobs}), "swap": swapped, "seconds": round(seconds, 2),
               "mismatches": mismatches, "left": left,
               "engine": {k: stats.get(k, 0) for k in ("steps", "preemptions", "graph_steps", "piecewise_steps",
                                                       "eager_steps", "prefix_cache_hits")}}
        summary["rounds"].append(row)
        for key in ("requests", "tokens", "aborted"):
            summary[key] += row[key]
        summary["tenants"] = sorted(set(summary["tenants"]) | set(row["tenants"]))
        summary["swaps"] += swapped
        summary["mismatches"] += len(mismatches)
        summary["leaks"] += bool(left)
        summary["pass"] = summary["mismatches"] == 0 and summary["leaks"] == 0
        summary["seconds"] = round(time.monotonic() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{name:9} round {round_no:3}: {row['requests']:2} requests, {row['tokens']:4} tokens, "
              f"{row['aborted']} aborted, swap {int(swapped)}, {len(mismatches)} mismatched"
              f"{', LEFT ' + json.dumps(left) if left else ''}  ({seconds:.1f} s; engine {row['engine']})", flush=True)
        for m in mismatches:
            job = {k: v for k, v in m["job"].items() if k != "prompt"}
            print("  MISMATCH", json.dumps({**m, "job": job, "tokens": None}), flush=True)

    for i, name in enumerate(args.configs):
        left = args.seconds - (time.monotonic() - start)
        until = time.monotonic() + left / (len(args.configs) - i)  # an equal share of what is left
        fuzz_config(world, name, args, SIZES[args.shape], rng, until, report)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="default: small on CUDA, tiny on the CPU")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                    help="engine configurations, one engine each (default: graphs piecewise on CUDA, graphs here)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--tie-margin", type=float, default=None,
                    help="a token this close to the reference's top logit passes (default 1e-3 fp32, 0.25 bf16)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time for the whole run, start-up included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=None, help="at most this many rounds per configuration")
    ap.add_argument("--round-timeout", type=float, default=300.0,
                    help="a round not done by then is a stall: reported, and the run ends")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's 2)")
    ap.add_argument("--kernel-backend", choices=["triton", "torch"], default="triton",
                    help="torch: the plain torch ops (the scheduling and slots without the kernels; fast here)")
    ap.add_argument("--out", default=None, help="results JSON (default $OUT/gpu_fuzz.json or bench/out/gpu_fuzz.json)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    cuda = args.device.startswith("cuda")
    if not cuda and args.kernel_backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    args.shape = args.shape or ("small" if cuda else "tiny")
    args.configs = args.configs or (["graphs", "piecewise"] if cuda else ["graphs"])
    args.tie_margin = args.tie_margin if args.tie_margin is not None else (1e-3 if args.dtype == "float32" else 0.25)
    out = Path(args.out or Path(os.environ.get("OUT", ROOT / "bench" / "out")) / "gpu_fuzz.json")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory(prefix="nlora-fuzz-") as scratch:
        world = World(Path(scratch), args.shape, args.device, args.layers)
        print(f"world ready in {time.monotonic() - start:.1f} s ({args.shape}, {args.dtype}, seed {args.seed})",
              flush=True)
        summary = fuzz(world, args, out, start)
    print(f"fuzz: {summary['requests']} requests, {summary['tokens']} tokens, {summary['aborted']} aborted, "
          f"{summary['swaps']} swaps over {len(summary['rounds'])} rounds: {summary['mismatches']} mismatched, "
          f"{summary['leaks']} rounds leaked  {'PASS' if summary['pass'] else 'FAIL'}", flush=True)
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
