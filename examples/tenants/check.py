"""Measure a trained tenant's behaviour against the base model on the held-out prompts.

Greedy answers (transformers, fp32, the tenant's N applied through the same r×r layer it was
trained with) to ``styles.EVAL_GENERAL`` (upper, signature) or ``styles.EVAL_NUMERIC`` (numbers),
none of which is in the training data, then the tenant's metric for both models:

    upper      share of letters in upper case, over all answers        pass: >= 0.8
    signature  share of answers ending with " -- Acme Support"          pass: >= 0.8
    numbers    share of answers with no digit (numbers in words)         pass: >= 0.8

    python examples/tenants/check.py upper [--dir examples/tenants/upper] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from make_data import greedy_answers
from styles import EVAL_GENERAL, EVAL_NUMERIC, digit_free, has_signature, upper_share

HERE = Path(__file__).resolve().parent
THRESHOLD = 0.8


def _upper(answers: list[str]) -> float:
    return upper_share("".join(answers))


METRICS = {  # tenant -> (prompts, metric over the list of answers)
    "upper": (EVAL_GENERAL, _upper),
    "signature": (EVAL_GENERAL, lambda a: sum(map(has_signature, a)) / len(a)),
    "numbers": (EVAL_NUMERIC, lambda a: sum(map(digit_free, a)) / len(a)),
}


def measure(tenant: str, adapter_dir: Path, model_name: str = "default", max_new_tokens: int = 64) -> dict:
    """``{"tenant", "base", "tenant_answers", "base_answers", "seconds"}`` for one tenant."""
    from nlora_serve.adapters.loader import read_adapter
    from nlora_serve.adapters.tune import attach
    from nlora_serve.models import load_base, load_hf_model

    t0 = time.perf_counter()
    base = load_base(model_name)
    prompts, metric = METRICS[tenant]
    base_model, tok = load_hf_model(base.path, torch.float32), base.tokenizer()
    tuned = copy.deepcopy(base_model)
    attach(tuned, read_adapter(adapter_dir, base))
    got = {name: greedy_answers(m, tok, prompts, max_new_tokens=max_new_tokens, desc=name)
           for name, m in (("base", base_model), ("tenant", tuned))}
    return {"tenant_metric": metric(got["tenant"]), "base_metric": metric(got["base"]), "prompts": prompts,
            "tenant_answers": got["tenant"], "base_answers": got["base"], "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tenant", choices=sorted(METRICS))
    parser.add_argument("--dir", type=Path, default=None, help="adapter directory (default: examples/tenants/TENANT)")
    parser.add_argument("--model", default="default", help="base model (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()
    res = measure(args.tenant, args.dir or HERE / args.tenant, args.model)
    if args.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return
    for p, b, t in zip(res["prompts"], res["base_answers"], res["tenant_answers"]):
        print(f"## {p}\n  base:   {b}\n  tenant: {t}")
    verdict = "PASS" if res["tenant_metric"] >= THRESHOLD > res["base_metric"] else "FAIL"
    print(f"{args.tenant}: tenant {res['tenant_metric']:.3f}, base {res['base_metric']:.3f} "
          f"(threshold {THRESHOLD}) {verdict}; {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
