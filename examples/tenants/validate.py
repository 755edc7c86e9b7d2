"""Validation for choosing a training knob WITHOUT the quality check's 20 prompts (``check.py``).

The prompts are the held-out split that ``adapters tune`` itself keeps out of training (same data,
fraction and seed as ``train.sh``: 67 of the 670 `lower` prompts, never trained on), so choosing on
them leaves ``styles.HELD_OUT`` untouched for the one final check. The base model and the tenant
answer each prompt greedily once and sampled (temperature 1, top-k and top-p off) ``--samples``
times with distinct seeds, through the serving engine in float32 as ``check.py`` does; the metrics
are ``check.py``'s: answers with an upper-case letter, upper-case share of letters, answers with a
word 3-gram or an in-word character 3-gram more than twice
(``check.degenerate``), and the base model's loss on the tenant's answers over that on its own
(both lower-cased; chunks of 16 answers, so the ratio of means matches ``check.py``'s). Rows come
for two prompt sets: ``split`` (tune's held-out split, template-worded like the training prompts)
and ``worded`` (``styles.VALIDATION_WORDED``: 24 prompts worded unlike any training template, half
counting or arithmetic; in no training file, whatever the data, so they compare recipes whose data
differ).

    python examples/tenants/validate.py --dir /tmp/lower-try [--samples 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path

import torch

from check import _answers, answer_losses, degenerate, max_in_word_trigram_count, max_trigram_count, undo
from styles import VALIDATION_WORDED, all_lower, upper_share

HERE = Path(__file__).resolve().parent
TENANT = "lower"  # the only tenant this was needed for; `styled` and `undo` below are its rules


def held_out_prompts(data: Path, fraction: float, seed: int, max_len: int = 192) -> list[str]:
    """The prompts of ``adapters tune``'s held-out split of ``data`` (its seeded ``split`` on the
    encoded examples, whose generator has no earlier use)."""
    from nlora_serve.adapters.tune_data import IGNORE, encode, read_examples, split
    from nlora_serve.models import load_base

    tok = load_base("default").tokenizer()
    examples = read_examples(data)
    kept = [m for m in examples if any(t != IGNORE for t in encode(tok, m, max_len)[1][1:])]
    assert len(kept) == len(examples), "tune would drop examples; the split below would differ"
    _, held = split(kept, fraction, torch.Generator().manual_seed(seed))
    return [m[0]["content"] for m in held]


def answers(adapter_dir: Path | None, greedy: list[str], sampled: list[str], seed: int) -> dict:
    """{0.0: greedy answers, 1.0: sampled answers} of the base model (``adapter_dir`` None) or the tenant."""
    from nlora_serve.engine.config import EngineConfig
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.models import load_base

    base = load_base("default")
    with tempfile.TemporaryDirectory(prefix="tenant-validate-") as store:
        with LLMEngine(EngineConfig(model="default", dtype=torch.float32, adapter_dir=store), base) as engine:
            if adapter_dir is not None:
                engine.adapters.register_dir(TENANT, adapter_dir)
            name = TENANT if adapter_dir is not None else None
            got0 = asyncio.run(_answers(engine, [name], 64, seed, greedy, temps=(0.0,)))
            got1 = asyncio.run(_answers(engine, [name], 64, seed, sampled, temps=(1.0,)))
    return {0.0: got0[(name, 0.0)], 1.0: got1[(name, 1.0)]}


def row(prompts: list[str], tenant: list[str], base: list[str], model, tok) -> dict:
    """check.py's numbers for `lower` on any prompts, plus the capitalised words found."""
    undone = [undo(TENANT, t, b) for t, b in zip(tenant, base)]
    t_loss, b_loss = [], []
    for i in range(0, len(prompts), 16):
        t_loss += answer_losses(model, tok, prompts[i: i + 16], [t for t, _ in undone[i: i + 16]])
        b_loss += answer_losses(model, tok, prompts[i: i + 16], [b for _, b in undone[i: i + 16]])
    return {"answers": len(tenant), "with_capital": sum(not all_lower(a) for a in tenant),
            "upper_share": upper_share("".join(tenant)), "max_trigram": max(map(max_trigram_count, tenant)),
            "max_char_trigram": max(map(max_in_word_trigram_count, tenant)),
            "degenerate": sum(map(degenerate, tenant)),
            "loss_ratio": (sum(t_loss) / len(t_loss)) / (sum(b_loss) / len(b_loss)),
            "capital_words": sorted({w for a in tenant for w in re.findall(r"\S*[A-Z]\S*", a)})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=HERE / TENANT, help="the tenant's adapter folder")
    parser.add_argument("--data", type=Path, default=HERE / "data" / f"{TENANT}.jsonl")
    parser.add_argument("--held-out", type=float, default=0.1, help="tune's --held-out (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=0, help="tune's --seed (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per prompt (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1000, help="first sampling seed (default: %(default)s)")
    parser.add_argument("--base-json", type=Path, default=None,
                        help="cache of the base model's answers (read when it matches, else written)")
    parser.add_argument("--json", type=Path, default=None, help="write rows and answers here")
    args = parser.parse_args()
    t0 = time.perf_counter()
    split_prompts = held_out_prompts(args.data, args.held_out, args.split_seed)
    prompts = split_prompts + VALIDATION_WORDED
    sampled = prompts * args.samples
    key = {"prompts": prompts, "samples": args.samples, "seed": args.seed}
    cached = json.loads(args.base_json.read_text()) if args.base_json and args.base_json.exists() else {}
    if cached.get("key") == key:
        base = {float(k): v for k, v in cached["answers"].items()}
    else:
        base = answers(None, prompts, sampled, args.seed)
        if args.base_json:
            args.base_json.write_text(json.dumps({"key": key, "answers": base}, ensure_ascii=False))
    tenant = answers(args.dir, prompts, sampled, args.seed)
    from nlora_serve.models import load_base, load_hf_model

    b = load_base("default")
    model, tok = load_hf_model(b.path, torch.float32), b.tokenizer()
    rows = {}
    for name, lo, hi in (("split", 0, len(split_prompts)), ("worded", len(split_prompts), len(prompts))):
        for temp, asked in ((0.0, prompts), (1.0, sampled)):
            idx = [j for j in range(len(asked)) if lo <= j % len(prompts) < hi]
            rows[f"{name} T={temp:g}"] = row([asked[j] for j in idx], [tenant[temp][j] for j in idx],
                                             [base[temp][j] for j in idx], model, tok)
    for label, r in rows.items():
        print(f"{label}: {r['answers'] - r['with_capital']}/{r['answers']} without a capital, upper share "
              f"{r['upper_share']:.4f}, max 3-gram {r['max_trigram']} / in a word {r['max_char_trigram']} "
              f"({r['degenerate']} degenerate), "
              f"loss ratio {r['loss_ratio']:.3f}; capitalised: {' '.join(r['capital_words'][:12])}")
    if args.json:
        args.json.write_text(json.dumps({"dir": str(args.dir), "rows": rows, "prompts": prompts,
                                         "answers": {str(k): v for k, v in tenant.items()},
                                         "base_answers": {str(k): v for k, v in base.items()}},
                                        indent=1, ensure_ascii=False))
    print(f"{len(prompts)} prompts, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
