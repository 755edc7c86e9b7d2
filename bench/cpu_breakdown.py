"""Where our CPU engine's time goes on the §9 workload: prefill steps and decode steps, by part.

Issue 22's profile. The engine runs DESIGN §9's workload (``--num-requests`` requests of
``--prompt-len`` random ids, ``--max-tokens`` new tokens, greedy) once per mix; wall-clock timers
wrapped around the engine's own calls split every step into: base GEMMs (the seven projections
of every layer), adapters (the adapter hook inside the projections, and the step's adapter
metadata), attention (KV write + paged attention), the rest of the forward (layer ops: RMSNorm,
RoPE, SiLU · up; embedding; residual adds), the lm_head (with the final norm), sampling (the finite check, penalties, sampling, detokenizing, emitting) and the host's
scheduling (the step minus all of those). Timers cost ~1 µs a call (~1% here).

    .venv/bin/python bench/cpu_breakdown.py --dtype bfloat16 --mix none tied64 lora8
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import nlora_serve.engine.model.adapter_layer as adapter_layer
import nlora_serve.engine.core as engine_core
import nlora_serve.engine.model.llama as llama
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.threads import threads_for_engine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.models import load_base

sys.path.insert(0, str(Path(__file__).parent))
import wall_timers  # noqa: E402  (bench/wall_timers.py)
from tenants import MIXES, write_mix  # noqa: E402  (bench/tenants.py)

TOTALS: collections.Counter = collections.Counter()  # seconds per part, since the start


def timed(part: str, fn):
    """``fn`` with its wall time added to TOTALS[part]."""
    return wall_timers.timed(fn, lambda seconds, *args: TOTALS.update({part: seconds}))


def instrument() -> None:
    """Wrap the engine's classes (every engine built afterwards is timed)."""
    llama.AdaptedLinear.__call__ = timed("gemm+adapters", llama.AdaptedLinear.__call__)
    llama.AdaptedLinear.deferred = timed("gemm+adapters", llama.AdaptedLinear.deferred)  # the native layer ops' path
    llama.LlamaModel.logits = timed("lm_head", llama.LlamaModel.logits)  # final norm, lm_head, to float32
    adapter_layer.AdapterHook.__call__ = timed("adapters", adapter_layer.AdapterHook.__call__)
    adapter_layer.AdapterHook.begin_step = timed("adapter_metadata", adapter_layer.AdapterHook.begin_step)
    engine_core.sample_step = timed("sampling", engine_core.sample_step)  # finite check, penalties, sampling


def run(model: str, dtype: torch.dtype, mix: str, args) -> dict:
    """One mix: seconds per part for prefill steps and for decode steps, and the throughput."""
    base = load_base(model, dtype)
    work = Path(tempfile.mkdtemp(prefix="nlora-breakdown-"))
    tenants, _ = write_mix(base, mix, work / "tenants", fold=False)
    config = EngineConfig(model=model, dtype=dtype, adapter_dir=str(work / "store") if tenants else None,
                          scheduler=SchedulerConfig(max_num_seqs=args.num_requests, max_num_batched_tokens=args.budget,
                                                    max_model_len=args.prompt_len + args.max_tokens),
                          cache=CacheConfig(block_size=16, num_blocks=args.num_requests * -(
                              -(args.prompt_len + args.max_tokens) // 16)))
    phases = {"prefill": collections.Counter(), "decode": collections.Counter()}
    steps = collections.Counter()
    with LLMEngine(config, base) as engine:
        names = [engine.adapters.register_dir(d.name, d).name for d in tenants]
        core, runner = engine.core, engine.core.runner
        for layer in runner.model.layers:
            layer.attention = timed("attention", layer.attention)
        runner.execute = timed("forward", runner.execute)
        core._settle = timed("sampling", core._settle)  # read-back, stop checks, detokenizing, emitting
        step = core.step

        def timed_step():
            kind = "decode" if all(r.seq.num_computed_tokens >= r.seq.num_prompt_tokens
                                   for r in core.requests.values()) else "prefill"
            before, start = TOTALS.copy(), time.perf_counter()
            try:
                return step()
            finally:
                phases[kind]["step"] += time.perf_counter() - start
                phases[kind].update({k: v - before[k] for k, v in TOTALS.items()})
                steps[kind] += 1

        core.step = timed_step
        prompts, warm = (torch.randint(100, base.spec.vocab_size, (args.num_requests, args.prompt_len),
                                       generator=torch.Generator().manual_seed(seed)).tolist()
                         for seed in (args.seed, args.seed + 1))
        assign = [names[i % len(names)] if names else None for i in range(args.num_requests)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        # an untimed pass of the same shape first (as bench/engine.py), so that first-call costs and
        # the page faults of the first 2,048-token steps' buffers stay out of the timing (after a
        # two-prompt warm-up the timed fp32 pass took 155k minor faults)
        engine.generate(warm, params, assign)
        for counter in phases.values():
            counter.clear()
        steps.clear()
        start = time.perf_counter()
        engine.generate(prompts, params, assign)
        seconds = time.perf_counter() - start
    return {"mix": mix, "seconds": seconds, "tok_per_s": args.num_requests * args.max_tokens / seconds,
            "steps": dict(steps), **{kind: split(c) for kind, c in phases.items()}}


def split(c: collections.Counter) -> dict:
    """Seconds per part of one step kind (the parts add up to the step time)."""
    gemm = c["gemm+adapters"] - c["adapters"]
    rest = c["forward"] - c["gemm+adapters"] - c["attention"] - c["lm_head"]
    return {"step_s": c["step"], "base_gemms_s": gemm, "adapters_s": c["adapters"] + c["adapter_metadata"],
            "attention_s": c["attention"], "lm_head_s": c["lm_head"], "layer_ops_and_rest_s": rest, "sampling_s": c["sampling"],
            "scheduling_s": c["step"] - c["forward"] - c["sampling"] - c["adapter_metadata"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--mix", nargs="+", choices=MIXES, default=["none"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out/cpu_breakdown.json")
    args = parser.parse_args()
    instrument()
    with threads_for_engine() as threads:  # first: the engine's step thread alone runs torch in parallel
        rows = [run(args.model, getattr(torch, args.dtype), mix, args) for mix in args.mix]
    print(f"{args.dtype}, {threads} threads; seconds over the run (prefill / decode steps)")
    parts = ["step_s", "base_gemms_s", "adapters_s", "attention_s", "lm_head_s", "layer_ops_and_rest_s", "sampling_s", "scheduling_s"]
    print("| mix | tok/s | steps | " + " | ".join(p[:-2] for p in parts) + " |")
    print("|---|---|---|" + "---|" * len(parts))
    for r in rows:
        cells = " | ".join(f"{r['prefill'][p]:.2f} / {r['decode'][p]:.2f}" for p in parts)
        print(f"| {r['mix']} | {r['tok_per_s']:.1f} | {r['steps'].get('prefill', 0)} / {r['steps'].get('decode', 0)} "
              f"| {cells} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
