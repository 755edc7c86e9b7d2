"""Does the KV budget hold under the sampler's worst case? (engine/runner/memory.py, engine/runner/dummy_sampler.py)

Builds the native engine on CUDA at ``--gpu-memory-utilization`` (the budget profiles a step with
the sampler's worst case and counts the CUDA graphs), then runs ``max_num_seqs`` requests that all
sample with every option at once (min-p, top-k, top-p, 20 logprobs, penalties, a logit bias) and
``max_num_seqs`` greedy ones. Checks: no OOM, and the device's memory in use at the end (all
processes: weights, KV cache, both allocator pools, graphs) stays within the utilization target.
Also reports the start-up seconds, the warm-up's report, and the slowest step after the first of
each kind (a first-use spike on a live request would show there). Prints JSON; exit status 1 if a
check fails. Not in gpu_check.sh (a Llama-8B-shaped start takes longer than its steps may).

    python bench/kv_budget_check.py --out $OUT/kv_budget.json                  # Llama-8B shape, dummy weights
    python bench/kv_budget_check.py --model bench/models/smollm2-135m --gpu-memory-utilization 0.5
    python bench/kv_budget_check.py --device cpu --model bench/models/smollm2-135m --max-num-seqs 8  # the logic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.core import EngineCore  # noqa: E402
from nlora_serve.engine.runner.warmup import SAMPLED  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402

GiB = 1 << 30


def run(args) -> dict:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    for name in ("nlora_serve.engine.runner.memory", "nlora_serve.engine.runner.warmup"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    cuda = args.device.startswith("cuda")
    config = EngineConfig(model=args.model, tokenizer=args.tokenizer,
                          load_format="dummy", device=args.device, dtype=getattr(torch, args.dtype),
                          kernel_backend="triton" if cuda else "torch",
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                                    max_model_len=args.max_model_len),
                          cache=CacheConfig() if cuda else CacheConfig(num_blocks=1024))
    start = time.perf_counter()
    core = EngineCore(config)
    start_s = time.perf_counter() - start
    sampled = dataclasses.replace(SAMPLED, max_tokens=args.new_tokens, min_tokens=args.new_tokens, seed=None)
    greedy = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(2 * args.max_num_seqs):
        prompt = torch.randint(100, core.vocab_size, (args.prompt_len,), generator=gen).tolist()
        core.add(f"r{i}", prompt, sampled if i < args.max_num_seqs else greedy)
    steps, error = [], None
    try:
        while core.has_work():
            t = time.perf_counter()
            core.step()
            if cuda:
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - t)
    except torch.OutOfMemoryError as e:  # the check this script exists for
        error = f"OOM after {len(steps)} steps: {e}"
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "config": vars(args), "start_s": start_s,
              "log": lines, "num_blocks": core.blocks.num_blocks, "steps": len(steps), "error": error,
              "first_step_s": steps[0] if steps else None,
              "slowest_later_step_s": max(steps[2:], default=None), "median_step_s": sorted(steps)[len(steps) // 2]}
    ok = error is None
    if cuda:
        free, total = torch.cuda.mem_get_info()
        target = args.gpu_memory_utilization * total
        result |= {"used_gib": (total - free) / GiB, "target_gib": target / GiB,
                   "reserved_peak_gib": torch.cuda.max_memory_reserved() / GiB}
        ok = ok and total - free <= target
    result["ok"] = ok
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "bench" / "models" / "llama-8b"))
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "models" / "smollm2-135m"),
                   help="llama-8b ships none (bench/models/README.md)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
