"""Prefix caching on a device: the engine with the cache on against the same engine with it off.

Random weights of the default model's shape (``--load-format dummy``: real weights do not travel
to the device machine), fp32 with TF32 off, three tenants (the base model and two tied adapters)
sending prompts that share a system prefix, chunked prefill (small token budget), two waves so the
second computes only past its cached blocks. Greedy tokens must be equal and the log-probability of
every generated token within ``--tol``; every wave-2 request must find its full blocks cached.
Writes JSON; exit status 1 when a check fails.

    python bench/gpu_prefix_check.py --device cuda --out bench/out/gpu_prefix.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.models import load_base
from nlora_serve.serving.commands.example_tenants import ensure_example_tenants


def run(base, store: Path, device: str, caching: bool, prompts, adapters, params) -> tuple[list, dict]:
    config = EngineConfig(model=str(base.path), dtype=base.dtype, device=device, load_format="dummy",
                          adapter_dir=str(store), enable_prefix_caching=caching,
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=96, max_model_len=512),
                          cache=CacheConfig(block_size=16, num_blocks=512))
    with LLMEngine(config, base) as engine:
        ensure_example_tenants(base, engine.adapters, 2)
        waves = [engine.generate(prompts, params, adapters) for _ in range(2)]
        return waves, engine.stats()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/models/smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest |log-prob on - off| of a generated token")
    ap.add_argument("--out", default="bench/out/gpu_prefix.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    base = load_base(args.model, torch.float32, load_format="dummy", init_device=args.device)
    rng = random.Random(0)
    system = [rng.randrange(100, base.spec.vocab_size) for _ in range(200)]
    prompts = [system + [rng.randrange(100, base.spec.vocab_size) for _ in range(20 + i)] for i in range(9)]
    adapters = [None, "tenant-000", "tenant-001"] * 3
    params = SamplingParams(max_tokens=16, min_tokens=16, temperature=0.0, logprobs=0)
    with tempfile.TemporaryDirectory() as scratch:
        on, stats_on = run(base, Path(scratch) / "store", args.device, True, prompts, adapters, params)
        off, stats_off = run(base, Path(scratch) / "store", args.device, False, prompts, adapters, params)
    mismatched, worst = [], 0.0
    for wave in range(2):
        for i, (a, b) in enumerate(zip(on[wave], off[wave])):
            if a.token_ids != b.token_ids:
                mismatched.append((wave, i))
                continue
            for t, la, lb in zip(a.token_ids, a.logprobs, b.logprobs):
                worst = max(worst, abs(la[t] - lb[t]))
    cached = [o.cached_tokens for o in on[1]]
    want = [(len(p) - 1) // 16 * 16 for p in prompts]
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "mismatched_requests": mismatched, "max_abs_logprob_diff": worst, "wave2_cached_tokens": cached,
              "wave2_cached_expected": want, "stats_on": stats_on, "stats_off": stats_off}
    ok = not mismatched and worst <= args.tol and cached == want
    result["ok"] = ok
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
