"""DESIGN §9 engine workload on the base model: our engine vs HF transformers static-batch generate.

64 requests submitted at once, prompts of 128 fixed seeded random token ids, 64 new tokens each
(ignore_eos for us, min_new_tokens for transformers), greedy, prefill included, in each dtype.
Prints a table and writes JSON (default bench/out/engine.json).

    .venv/bin/python bench/engine.py                      # full workload, fp32 and bf16
    .venv/bin/python bench/engine.py --num-requests 8 --dtype float32
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from nlora_serve.models import load_base, load_hf_model, resolve_model
from nlora_serve.models.dtype import DTYPES
from nlora_serve.serving.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.serving.engine import LLMEngine
from nlora_serve.serving.sampling import SamplingParams


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` random ids, clear of the low ids where special tokens sit."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (num, length), generator=gen).tolist()


def run_ours(model: str, dtype: torch.dtype, prompts: list[list[int]], new_tokens: int, budget: int) -> dict:
    base = load_base(model, dtype)
    blocks_per_seq = -(-(len(prompts[0]) + new_tokens) // 16)
    config = EngineConfig(model=model, dtype=dtype,
                          scheduler=SchedulerConfig(max_num_seqs=len(prompts), max_num_batched_tokens=budget,
                                                    max_model_len=len(prompts[0]) + new_tokens),
                          cache=CacheConfig(block_size=16, num_blocks=blocks_per_seq * len(prompts)))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    with LLMEngine(config, base) as engine:
        engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        steps = engine.stats()["steps"]
    tokens = sum(len(o.token_ids) for o in outs)
    return {"seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds, "steps": steps}


@torch.inference_mode()
def run_hf(path: Path, dtype: torch.dtype, prompts: list[list[int]], new_tokens: int) -> dict:
    model = load_hf_model(path, dtype)
    ids = torch.tensor(prompts)  # equal lengths: left padding is a no-op, the mask is all ones
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, pad_token_id=model.config.eos_token_id)
    model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, min_new_tokens=4, **kwargs)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         **kwargs)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model: 'default', a HF directory or a .gguf file")
    parser.add_argument("--num-requests", type=int, default=64, help="requests submitted at once")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--budget", type=int, default=2048, help="our per-step token budget")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", default="bench/out/engine.json", help="JSON output path")
    args = parser.parse_args()
    path = resolve_model(args.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
    rows = []
    for name in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
        ours = run_ours(args.model, DTYPES[name], prompts, args.max_tokens, args.budget)
        gc.collect()
        hf = run_hf(path, DTYPES[name], prompts, args.max_tokens)
        gc.collect()
        rows.append({"dtype": name, "ours": ours, "hf_transformers": hf,
                     "ratio": ours["tok_per_s"] / hf["tok_per_s"]})
    print(f"{'dtype':<10}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['ours']['tok_per_s']:>12.1f}{r['hf_transformers']['tok_per_s']:>12.1f}"
              f"{r['ratio']:>7.2f}x")
    result = {"workload": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                                  "threads": torch.get_num_threads(),
                                                  "torch": torch.__version__}, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
