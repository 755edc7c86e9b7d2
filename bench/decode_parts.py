"""Where one decode step of our CPU engine goes, op by op (issue 22).

Finer than bench/cpu_breakdown.py: wall-clock timers around the engine's own calls (the base
GEMMs, the attention, each native layer op, the logits, sampling, the step's bookkeeping), over
the decode steps of DESIGN §9's workload (64 requests × 128-token prompts × 64 new tokens,
greedy, base model), printed as milliseconds per step and calls per step. Timers cost ~1 µs a
call. Run with the box quiet: this is a wall-clock measurement.

    .venv/bin/python bench/decode_parts.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import nlora_serve.engine.core as engine_core
import nlora_serve.engine.model.llama as llama
import nlora_serve.kernels.cpu.gemm as cpu_gemm
import nlora_serve.kernels.cpu.layer_ops as layer_ops
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.threads import threads_for_engine
from nlora_serve.models import load_base

import wall_timers  # (bench/wall_timers.py: the script's folder is first on sys.path)

SECONDS: collections.Counter = collections.Counter()  # per part, decode steps only
CALLS: collections.Counter = collections.Counter()
TIMING = [False]  # on during decode steps


def timed(part: str, fn):
    """``fn`` with its wall time added to SECONDS[part] while TIMING is on."""
    def record(seconds: float, *args) -> None:
        if TIMING[0]:
            SECONDS[part] += seconds
            CALLS[part] += 1
    return wall_timers.timed(fn, record)


def instrument() -> None:
    """Wrap the classes (every engine built afterwards is timed)."""
    part = "base GEMMs (lm_head included)"  # ours (the kernel call) and oneDNN's: no call counted twice
    cpu_gemm.NativeGemm.__call__ = timed(part, cpu_gemm.NativeGemm.__call__)
    cpu_gemm.PackedLinear.__call__ = timed(part, cpu_gemm.PackedLinear.__call__)
    for name in ("add_rms_norm", "rope", "silu_mul"):
        setattr(layer_ops.LayerOps, name, timed(name, getattr(layer_ops.LayerOps, name)))
    llama.LlamaModel.logits = timed("logits (final norm, lm_head, float)", llama.LlamaModel.logits)
    engine_core.sample_step = timed("sampling", engine_core.sample_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=64)
    args = parser.parse_args()
    instrument()
    with threads_for_engine() as threads:
        dtype = getattr(torch, args.dtype)
        base = load_base("default", dtype)
        n = args.num_requests
        config = EngineConfig(model="default", dtype=dtype,
                              scheduler=SchedulerConfig(max_num_seqs=n, max_num_batched_tokens=2048, max_model_len=192),
                              cache=CacheConfig(block_size=16, num_blocks=n * 12))
        with LLMEngine(config, base) as engine:
            core = engine.core
            for layer in core.runner.model.layers:
                layer.attention = timed("attention (KV write + paged decode)", layer.attention)
            core.runner.execute = timed("forward", core.runner.execute)
            step = core.step

            def timed_step():
                TIMING[0] = all(r.seq.num_computed_tokens >= r.seq.num_prompt_tokens for r in core.requests.values())
                start = time.perf_counter()
                try:
                    return step()
                finally:
                    if TIMING[0]:
                        SECONDS["step"] += time.perf_counter() - start
                        CALLS["step"] += 1

            core.step = timed_step
            gen = torch.Generator().manual_seed(0)
            prompts = torch.randint(100, base.spec.vocab_size, (n, 128), generator=gen).tolist()
            params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
            engine.generate(prompts[:2], params)  # first-call costs out of the timing
            SECONDS.clear()
            CALLS.clear()
            engine.generate(prompts, params)
    steps = CALLS["step"]
    print(f"{args.dtype}, {threads} threads, {steps} decode steps of up to {n} sequences; ms per step")
    for part, seconds in SECONDS.most_common():
        print(f"  {part:40s} {seconds / steps * 1e3:7.2f} ms  ({CALLS[part] / steps:.0f} calls a step)")


if __name__ == "__main__":
    main()
