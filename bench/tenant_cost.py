"""What tenants cost our engine on the CPU, measured in interleaved rounds (issue 22's ratios).

bench/engine.py runs each mix once, one after the other, so on a shared box whose speed drifts by
tens of percent over minutes (bench/RESULTS.md: the same base run at 133 and 221 tok/s within ten
minutes) a mix's ratio to the base says as much about the drift as about the tenants. Here every
round runs the base and each tenant mix back to back, in an order that alternates between rounds
(none, tied64, lora8, then lora8, tied64, none, ...), and the ratio is taken within the round; the
table gives each round's ratios and their median. Same workload and engine runs as
bench/engine.py (DESIGN §9: 64 requests × 128-token prompts × 64 new tokens, greedy, prefill
included, an untimed warm-up pass first; ours only).

    .venv/bin/python bench/tenant_cost.py --dtype bfloat16 --rounds 3
    .venv/bin/python bench/tenant_cost.py --no-amx ...   # the AVX-512 paths on an AMX CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
from pathlib import Path

import torch

from nlora_serve.engine.threads import threads_for_engine
from nlora_serve.models import load_base, resolve_model
from nlora_serve.models.dtype import DTYPES

from engine import make_prompts, run_ours  # bench/engine.py (run this script from the repo root)
from tenants import MIXES, write_mix  # bench/tenants.py


def rounds(args: argparse.Namespace) -> dict:
    """{dtype: [{mix: tok/s} per round]}."""
    path = resolve_model(args.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
    warm = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed + 1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="nlora-bench-") as scratch:
        host = load_base(args.model, torch.float32)
        tenants = {m: write_mix(host, m, Path(scratch), fold=False)[0] for m in MIXES}
        del host
        for name in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
            out[name] = []
            for k in range(args.rounds):
                order = list(MIXES) if k % 2 == 0 else list(reversed(MIXES))
                tok_s = {}
                for mix in order:
                    store = Path(scratch) / f"store-{name}-{mix}-{k}"
                    tok_s[mix] = run_ours(args.model, DTYPES[name], prompts, args.max_tokens, args.budget,
                                          tenants[mix], store, warm_prompts=warm, cpu_amx=args.amx)["tok_per_s"]
                    gc.collect()
                print(f"{name} round {k + 1} ({', '.join(order)}): "
                      + ", ".join(f"{m} {tok_s[m]:.1f} tok/s" for m in MIXES), flush=True)
                out[name].append(tok_s)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all mixes (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=2048, help="per-step token budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out/tenant_cost.json")
    parser.add_argument("--no-amx", dest="amx", action="store_false",
                        help="keep the native ops' AVX-512 paths on an AMX CPU (EngineConfig.cpu_amx)")
    args = parser.parse_args()
    with threads_for_engine() as threads:
        result = rounds(args)
    print(f"\n{threads} threads; tok/s per round, and each mix over the same round's base")
    print("| dtype | mix | tok/s by round | vs base by round | median vs base |")
    print("|---|---|---|---|---|")
    for name, per_round in result.items():
        for mix in MIXES:
            ratios = [r[mix] / r["none"] for r in per_round]
            print(f"| {name} | {mix} | {' / '.join(f'{r[mix]:.1f}' for r in per_round)} | "
                  f"{' / '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workload": vars(args), "threads": threads, "rounds": result}, indent=2))


if __name__ == "__main__":
    main()
