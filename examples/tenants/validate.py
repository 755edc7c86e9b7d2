"""Validation for choosing a tenant's recipe WITHOUT the quality check's 20 prompts (``check.py``).

The prompts are the held-out split that ``adapters tune`` itself keeps out of training (same data,
fraction and seed as ``train.sh``: e.g. 67 of the 670 `lower` prompts, 28 of the 274 `signature`
ones, never trained on), so choosing on them leaves ``styles.HELD_OUT`` untouched for the one final
check. The base model and the tenant answer each prompt greedily once and sampled (temperature 1,
top-k and top-p off) ``--samples`` times with distinct seeds, through the serving engine in float32
as ``check.py`` does; the metrics are ``check.py``'s, with its per-tenant rules (``styled``,
``undo``): answers in the tenant's style (for `lower` the strict reading, no upper-case letter
and at least one letter: ``validation_styled``), answers with a word 3-gram or an in-word character
3-gram more than twice (``check.degenerate``), failing answers (either), and the base model's loss
on the tenant's answers over that on its own, style undone (chunks of 16 answers, so the ratio of
means matches ``check.py``'s). Rows come for two prompt sets: ``split`` (tune's held-out split,
template-worded like the training prompts) and ``worded`` (``styles.VALIDATION_WORDED``: 24
prompts worded unlike any training template, half counting or arithmetic; in no training file,
whatever the data, so they compare recipes whose data differ).

    python examples/tenants/validate.py --tenant signature --dir /tmp/sig-try [--samples 3] [--json out.json]
    python examples/tenants/validate.py --tenant signature --choose c0.json c1.json ...   # the rule

``--choose`` applies the tenant's selection rule (``RULES``; written in README.md here before the
first validation number of each tenant) to the rows of earlier ``--json`` files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from check import (TENANTS, _answers, answer_losses, degenerate, max_in_word_trigram_count, max_trigram_count,
                   styled, undo)
from styles import VALIDATION_WORDED, all_lower, upper_share

HERE = Path(__file__).resolve().parent
CELLS = ("split T=0", "split T=1", "worded T=0", "worded T=1")


def validation_styled(tenant: str, answer: str) -> bool:
    """Whether one answer counts as styled here: ``check.styled``, except that `lower` is read
    strictly (no upper-case letter at all, the count its recipes were chosen on: the 90 % bar
    barely separates it from the base model) and an answer without letters is not styled (it
    shows no case)."""
    if tenant == "lower":
        return all_lower(answer) and any(c.isalpha() for c in answer)
    return styled(tenant, answer)


def answer_counts(tenant: str, answers: list[str]) -> dict:
    """{"answers", "styled", "degenerate", "failing" (not styled or degenerate)} over ``answers``."""
    bad = [not validation_styled(tenant, a) or degenerate(a) for a in answers]
    return {"answers": len(answers), "styled": sum(validation_styled(tenant, a) for a in answers),
            "degenerate": sum(map(degenerate, answers)), "failing": sum(bad)}


@dataclass(frozen=True)
class Rule:
    """A tenant's selection rule over the four cells (``CELLS``) of each candidate's rows.

    Eligible: no degenerate answer in ``degenerate_cells``, at least ``styled_min`` of the answers
    styled in every cell (None: no bar), and a loss ratio <= ``ratio_max`` in each of
    ``ratio_cells``. Among the eligible, the fewest failing answers over all cells, then the lowest
    worded T = 0 loss ratio; with none eligible, the fewest degenerate answers over all cells, then
    the same two keys."""
    degenerate_cells: tuple[str, ...]
    styled_min: float | None
    ratio_cells: tuple[str, ...]
    ratio_max: float


# README.md here, "Choosing on validation prompts": each written before the tenant's first number.
RULES = {"lower": Rule(("split T=0", "worded T=0"), None, ("worded T=0",), 1.4),
         "signature": Rule(CELLS, 0.9, ("split T=0", "worded T=0"), 1.4)}
RULES["numbers"] = RULES["signature"]


def eligible(rule: Rule, rows: dict) -> bool:
    """Whether one candidate's rows ({cell: row}) meet ``rule``'s bars."""
    return (all(rows[c]["degenerate"] == 0 for c in rule.degenerate_cells)
            and (rule.styled_min is None or all(rows[c]["styled"] >= rule.styled_min * rows[c]["answers"]
                                                for c in CELLS))
            and all(rows[c]["loss_ratio"] <= rule.ratio_max for c in rule.ratio_cells))


def choose(rule: Rule, candidates: dict[str, dict]) -> tuple[str, bool]:
    """(the chosen candidate's name, whether it was eligible) among ``candidates`` ({name: rows})."""
    if not candidates:
        raise ValueError("choose: no candidates")
    total = {n: {k: sum(rows[c][k] for c in CELLS) for k in ("failing", "degenerate")} for n, rows in candidates.items()}
    ok = [n for n, rows in candidates.items() if eligible(rule, rows)]
    pool = ok or list(candidates)
    first = (lambda n: ()) if ok else (lambda n: (total[n]["degenerate"],))
    best = min(pool, key=lambda n: (*first(n), total[n]["failing"], candidates[n]["worded T=0"]["loss_ratio"]))
    return best, bool(ok)


def held_out_prompts(data: Path, fraction: float, seed: int, max_len: int = 192) -> list[str]:
    """The prompts of ``adapters tune``'s held-out split of ``data`` (its seeded ``split`` on the
    encoded examples, whose generator has no earlier use)."""
    from nlora_serve.adapters.tune.data import IGNORE, encode, read_examples, split
    from nlora_serve.models import load_base

    tok = load_base("default").tokenizer()
    examples = read_examples(data)
    kept = [m for m in examples if any(t != IGNORE for t in encode(tok, m, max_len)[1][1:])]
    assert len(kept) == len(examples), "tune would drop examples; the split below would differ"
    _, held = split(kept, fraction, torch.Generator().manual_seed(seed))
    return [m[0]["content"] for m in held]


def answers(tenant: str, adapter_dir: Path | None, greedy: list[str], sampled: list[str], seed: int) -> dict:
    """{0.0: greedy answers, 1.0: sampled answers} of the base model (``adapter_dir`` None) or the tenant."""
    from nlora_serve.engine.config import EngineConfig
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.models import load_base

    base = load_base("default")
    with tempfile.TemporaryDirectory(prefix="tenant-validate-") as store:
        with LLMEngine(EngineConfig(model="default", dtype=torch.float32, adapter_dir=store), base) as engine:
            if adapter_dir is not None:
                engine.adapters.register_dir(tenant, adapter_dir)
            name = tenant if adapter_dir is not None else None
            got0 = asyncio.run(_answers(engine, [name], 64, seed, greedy, temps=(0.0,)))
            got1 = asyncio.run(_answers(engine, [name], 64, seed, sampled, temps=(1.0,)))
    return {0.0: got0[(name, 0.0)], 1.0: got1[(name, 1.0)]}


def row(name: str, prompts: list[str], tenant: list[str], base: list[str], model, tok) -> dict:
    """check.py's numbers for tenant ``name`` on any prompts, plus the answers not styled."""
    undone = [undo(name, t, b) for t, b in zip(tenant, base)]
    t_loss, b_loss = [], []
    for i in range(0, len(prompts), 16):
        t_loss += answer_losses(model, tok, prompts[i: i + 16], [t for t, _ in undone[i: i + 16]])
        b_loss += answer_losses(model, tok, prompts[i: i + 16], [b for _, b in undone[i: i + 16]])
    return {**answer_counts(name, tenant), "upper_share": upper_share("".join(tenant)),
            "max_trigram": max(map(max_trigram_count, tenant)),
            "max_char_trigram": max(map(max_in_word_trigram_count, tenant)),
            "loss_ratio": (sum(t_loss) / len(t_loss)) / (sum(b_loss) / len(b_loss)),
            "capital_words": sorted({w for a in tenant for w in re.findall(r"\S*[A-Z]\S*", a)}),
            "not_styled": [a for a in tenant if not validation_styled(name, a)],
            "degenerate_answers": [a for a in tenant if degenerate(a)]}


def print_choice(tenant: str, files: list[Path]) -> None:
    """One line per candidate (cells: styled, degenerate, loss ratio) and the rule's choice."""
    candidates = {}
    for f in files:
        got = json.loads(f.read_text())
        if got.get("tenant", "lower") != tenant:
            raise SystemExit(f"{f}: rows of tenant {got.get('tenant', 'lower')!r}, not {tenant!r}")
        candidates[str(f)] = got["rows"]
    for name, rows in candidates.items():
        cells = " | ".join(f"{rows[c]['styled']}/{rows[c]['answers']}, {rows[c]['degenerate']}, "
                           f"{rows[c]['loss_ratio']:.2f}" for c in CELLS)
        print(f"| {name} | {cells} | {sum(rows[c]['failing'] for c in CELLS)} "
              f"| {'yes' if eligible(RULES[tenant], rows) else 'no'} |")
    best, was_eligible = choose(RULES[tenant], candidates)
    print(f"chosen: {best} ({'eligible' if was_eligible else 'none eligible: the fallback'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenant", choices=TENANTS, default="lower", help="whose rules (default: %(default)s)")
    parser.add_argument("--dir", type=Path, default=None, help="the adapter folder (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=None, help="tune's --data (default: data/TENANT.jsonl)")
    parser.add_argument("--held-out", type=float, default=0.1, help="tune's --held-out (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=0, help="tune's --seed (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per prompt (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1000, help="first sampling seed (default: %(default)s)")
    parser.add_argument("--base-json", type=Path, default=None,
                        help="cache of the base model's answers (read when it matches, else written)")
    parser.add_argument("--json", type=Path, default=None, help="write rows and answers here")
    parser.add_argument("--choose", type=Path, nargs="+", default=None, metavar="JSON",
                        help="apply the tenant's selection rule to these --json files instead")
    args = parser.parse_args()
    if args.choose:
        print_choice(args.tenant, args.choose)
        return 0
    adapter_dir = args.dir or HERE / args.tenant
    data = args.data or HERE / "data" / f"{args.tenant}.jsonl"
    t0 = time.perf_counter()
    split_prompts = held_out_prompts(data, args.held_out, args.split_seed)
    prompts = split_prompts + VALIDATION_WORDED
    sampled = prompts * args.samples
    key = {"prompts": prompts, "samples": args.samples, "seed": args.seed}
    cached = json.loads(args.base_json.read_text()) if args.base_json and args.base_json.exists() else {}
    if cached.get("key") == key:
        base = {float(k): v for k, v in cached["answers"].items()}
    else:
        base = answers(args.tenant, None, prompts, sampled, args.seed)
        if args.base_json:
            args.base_json.write_text(json.dumps({"key": key, "answers": base}, ensure_ascii=False))
    tenant = answers(args.tenant, adapter_dir, prompts, sampled, args.seed)
    from nlora_serve.models import load_base, load_hf_model

    b = load_base("default")
    model, tok = load_hf_model(b.path, torch.float32), b.tokenizer()
    rows = {}
    for name, lo, hi in (("split", 0, len(split_prompts)), ("worded", len(split_prompts), len(prompts))):
        for temp, asked in ((0.0, prompts), (1.0, sampled)):
            idx = [j for j in range(len(asked)) if lo <= j % len(prompts) < hi]
            rows[f"{name} T={temp:g}"] = row(args.tenant, [asked[j] for j in idx], [tenant[temp][j] for j in idx],
                                             [base[temp][j] for j in idx], model, tok)
    for label, r in rows.items():
        print(f"{label}: {r['styled']}/{r['answers']} styled, upper share {r['upper_share']:.4f}, max 3-gram "
              f"{r['max_trigram']} / in a word {r['max_char_trigram']} ({r['degenerate']} degenerate), "
              f"loss ratio {r['loss_ratio']:.3f}; not styled: {' | '.join(a[:60] for a in r['not_styled'][:3])}")
    if args.json:
        args.json.write_text(json.dumps({"tenant": args.tenant, "dir": str(adapter_dir), "data": str(data),
                                         "rows": rows, "prompts": prompts,
                                         "answers": {str(k): v for k, v in tenant.items()},
                                         "base_answers": {str(k): v for k, v in base.items()}},
                                        indent=1, ensure_ascii=False))
    print(f"{len(prompts)} prompts, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
