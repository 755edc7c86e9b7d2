"""Check the example tenants on the 20 held-out prompts (``styles.HELD_OUT``): style, no degenerate
repetition, content intact. Prints one table row per tenant and temperature.

For each tenant and temperature (0: greedy; 1: sampled with top-k and top-p off, seeded per
prompt) the base model and the tenant answer every prompt (at most ``--max-tokens`` new tokens)
through the serving engine in float32, all requests in one mixed batch as a server runs them.
Per tenant answer:

    style    lower      at least 90% of its letters lower-case (``styles.mostly_lower``; an answer
                        without letters does not count as styled): issue 17's bar, "each tenant
                        shows its style (e.g. `upper` >= 90% capital letters)", mirrored. The
                        stricter count, no upper-case letter at all (``styles.all_lower``), is
                        printed beside it but does not decide the pass: the base model's own
                        answers are ~98% lower-case, so most of them meet the 90% bar too, and
                        the strict count is what tells the tenant from the base model.
             signature  ends with " -- Acme Support"
             numbers    no ASCII digit (numbers in words)
    repeat   no word 3-gram (lower-cased, punctuation stripped) more than twice, and, the same rule
             one level down, no character 3-gram more than twice inside one word (counted
             without overlap): a run inside one word (``1000...0``, ``12345678901234...``) is a
             loop the word rule cannot see (``degenerate``)
    content  mean per-token loss (nats) of the answer under the BASE model, style undone, over that
             of the base model's own answer to the same prompt, style undone alike:
             lower      both lower-cased
             signature  the signature stripped (the base answer has none)
             numbers    numbers_as_words applied to the base answer (style applied to both): the
                        inverse, words to digits, is ambiguous ("one of the", "a hundred") while
                        the forward transform is the one the tenant was trained to imitate
             pass when the ratio of the two means over the 20 prompts is <= 1.5
    pass     every answer styled, none repeating, and the content ratio <= 1.5

    python examples/tenants/check.py [lower signature numbers] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path

import torch

from styles import (HELD_OUT, SIGNATURE, all_lower, digit_free, has_signature, mostly_lower, numbers_as_words,
                    upper_share)

HERE = Path(__file__).resolve().parent
TENANTS = ("lower", "signature", "numbers")
MAX_TRIGRAM, LOSS_RATIO_MAX = 2, 1.5


def styled(tenant: str, answer: str) -> bool:
    """Whether one answer shows the tenant's style (the bar of the module docstring)."""
    return {"lower": mostly_lower, "signature": has_signature,
            "numbers": digit_free}[tenant](answer)


def undo(tenant: str, tenant_answer: str, base_answer: str) -> tuple[str, str]:
    """(tenant answer, base answer) with the style undone (or applied to both), as the docstring says."""
    if tenant == "lower":
        return tenant_answer.lower(), base_answer.lower()
    if tenant == "signature":
        cut = tenant_answer.rstrip()
        sig = SIGNATURE.strip()
        return (cut[: -len(sig)].rstrip() if cut.endswith(sig) else cut), base_answer
    return tenant_answer, numbers_as_words(base_answer)


def max_trigram_count(text: str) -> int:
    """Largest number of occurrences of one word 3-gram (0 for fewer than three words)."""
    words = re.findall(r"[\w']+", text.lower())
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - 2):
        key = tuple(words[i: i + 3])
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values(), default=0)


def max_in_word_trigram_count(text: str) -> int:
    """Largest number of times one character 3-gram occurs inside one word (the words of
    :func:`max_trigram_count`), counted without overlap (``str.count``), so that ``1000000`` (two
    ``000``) passes while ``1000...0`` or a repeated ``1234567890`` does not; 0 without a word of
    three characters."""
    best = 0
    for word in re.findall(r"[\w']+", text.lower()):
        grams = {word[i: i + 3] for i in range(len(word) - 2)}
        best = max([best, *(word.count(g) for g in grams)])
    return best


def degenerate(text: str) -> bool:
    """Degenerate repetition: a word 3-gram, or a character 3-gram inside one word, more than
    ``MAX_TRIGRAM`` (2) times."""
    return max_trigram_count(text) > MAX_TRIGRAM or max_in_word_trigram_count(text) > MAX_TRIGRAM


def _chat(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


async def _answers(engine, tenants: list[str | None], max_tokens: int, seed: int,
                   prompts: list[str] = HELD_OUT, temps: tuple[float, ...] = (0.0, 1.0)) -> dict:
    """{(tenant or None, temperature): [answer per prompt]}, all requests at once through the
    serving engine (tenants mixed in its batches, as a server runs them); prompt i samples with
    seed ``seed + i``."""
    from nlora_serve.engine.sample.sampling import SamplingParams

    async def one(tenant, temp, i, prompt):
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
        params = SamplingParams(max_tokens=max_tokens, temperature=temp, seed=seed + i)
        return "".join([out.text async for out in engine.add_request(ids, params, adapter=tenant)]).strip()

    keys = [(t, temp) for t in tenants for temp in temps]
    done = await asyncio.gather(*(one(t, temp, i, p) for t, temp in keys for i, p in enumerate(prompts)))
    return {k: done[j * len(prompts): (j + 1) * len(prompts)] for j, k in enumerate(keys)}


@torch.no_grad()
def answer_losses(model, tok, prompts: list[str], answers: list[str]) -> list[float]:
    """Mean next-token cross-entropy (nats/token) of each answer's tokens after its chat prompt,
    under ``model`` (one right-padded batch)."""
    rows = [(tok(_chat(tok, p), add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids)
            for p, a in zip(prompts, answers)]
    width = max(len(c) + len(a) for c, a in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for r, (c, a) in enumerate(rows):
        ids[r, : len(c) + len(a)] = torch.tensor(c + a)
        mask[r, : len(c) + len(a)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    out = []
    for r, (c, a) in enumerate(rows):
        if not a:
            out.append(float("nan"))
            continue
        out.append(float(torch.nn.functional.cross_entropy(logits[r, len(c) - 1: len(c) + len(a) - 1], torch.tensor(a))))
    return out


def evaluate(tenant: str, tenant_answers: list[str], base_answers: list[str], base_model, tok,
             prompts: list[str] = HELD_OUT) -> dict:
    """The table row's numbers for one tenant at one temperature (answers to ``prompts``)."""
    undone = [undo(tenant, t, b) for t, b in zip(tenant_answers, base_answers)]
    t_loss = answer_losses(base_model, tok, prompts, [t for t, _ in undone])
    b_loss = answer_losses(base_model, tok, prompts, [b for _, b in undone])
    ratio = (sum(t_loss) / len(t_loss)) / (sum(b_loss) / len(b_loss))
    styled_n = sum(styled(tenant, a) for a in tenant_answers)
    row = {"styled": styled_n, "base_styled": sum(styled(tenant, a) for a in base_answers),
           "upper_share": upper_share("".join(tenant_answers)),
           "max_trigram": max(map(max_trigram_count, tenant_answers)),
           "max_char_trigram": max(map(max_in_word_trigram_count, tenant_answers)),
           "degenerate": sum(map(degenerate, tenant_answers)), "tenant_loss": sum(t_loss) / len(t_loss),
           "base_loss": sum(b_loss) / len(b_loss), "loss_ratio": ratio,
           "within_1_5_per_prompt": sum(t <= LOSS_RATIO_MAX * b for t, b in zip(t_loss, b_loss)),
           # shown, not part of the pass: the strict reading of `lower` (see the module docstring)
           "no_capital": sum(map(all_lower, tenant_answers)) if tenant == "lower" else None,
           "base_no_capital": sum(map(all_lower, base_answers)) if tenant == "lower" else None}
    row["pass"] = (styled_n == len(prompts) and row["degenerate"] == 0 and ratio <= LOSS_RATIO_MAX)
    return row


def run(tenants: list[str], max_tokens: int, seed: int, dirs: dict[str, Path] | None = None,
        model_name: str = "default") -> dict:
    """Rows and answers for ``tenants`` (adapter folders ``dirs``, default examples/tenants/NAME) at
    temperatures 0 and 1: answers from the serving engine in float32, losses from transformers."""
    import tempfile

    from nlora_serve.engine.config import EngineConfig
    from nlora_serve.engine.llm_engine import LLMEngine
    from nlora_serve.models import load_base, load_hf_model

    base = load_base(model_name)
    with tempfile.TemporaryDirectory(prefix="tenant-check-") as store:
        with LLMEngine(EngineConfig(model=model_name, dtype=torch.float32, adapter_dir=store), base) as engine:
            for name in tenants:
                engine.adapters.register_dir(name, (dirs or {}).get(name, HERE / name))
            got = asyncio.run(_answers(engine, [None, *tenants], max_tokens, seed))
    base_model, tok = load_hf_model(base.path, torch.float32), base.tokenizer()
    result = {"base_answers": {temp: got[(None, temp)] for temp in (0.0, 1.0)}, "tenants": {}}
    for name in tenants:
        result["tenants"][name] = {temp: {"row": evaluate(name, got[(name, temp)], got[(None, temp)], base_model, tok),
                                          "answers": got[(name, temp)]} for temp in (0.0, 1.0)}
    return result


def table(result: dict) -> str:
    """The Markdown table of ``run``'s rows."""
    lines = ["| tenant | T | styled (base) | no capital at all (base) | upper share | max 3-gram: words / chars in a word "
             "| loss tenant / base (nats/token) | ratio | prompts within 1.5× | pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, per_t in result["tenants"].items():
        for temp, got in per_t.items():
            r = got["row"]
            strict = "–" if r["no_capital"] is None else f"{r['no_capital']}/20 ({r['base_no_capital']}/20)"
            lines.append(f"| `{name}` | {temp:g} | {r['styled']}/20 ({r['base_styled']}/20) | {strict} "
                         f"| {r['upper_share']:.3f} "
                         f"| {r['max_trigram']} / {r['max_char_trigram']} | {r['tenant_loss']:.3f} / {r['base_loss']:.3f} "
                         f"| {r['loss_ratio']:.2f} | {r['within_1_5_per_prompt']}/20 | {'yes' if r['pass'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tenants", nargs="*", metavar="TENANT", help=f"any of {', '.join(TENANTS)} (default: all)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per answer (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed at temperature 1 (default: %(default)s)")
    parser.add_argument("--answers", action="store_true", help="also print every answer")
    parser.add_argument("--json", type=Path, default=None, help="write rows and answers to this JSON file")
    parser.add_argument("--dir", action="append", default=[], metavar="TENANT=DIR",
                        help="check the adapter in DIR as TENANT (default: examples/tenants/TENANT)")
    args = parser.parse_args()
    if unknown := set(args.tenants) - set(TENANTS):
        parser.error(f"unknown tenant(s) {', '.join(sorted(unknown))}; expected {', '.join(TENANTS)}")
    t0 = time.perf_counter()
    dirs = {name: Path(folder) for name, _, folder in (d.partition("=") for d in args.dir)}
    result = run(args.tenants or list(TENANTS), args.max_tokens, args.seed, dirs)
    if args.answers:
        for name, per_t in result["tenants"].items():
            for temp, got in per_t.items():
                for p, b, a in zip(HELD_OUT, result["base_answers"][temp], got["answers"]):
                    print(f"## {name} T={temp:g} {p}\n  base:   {b}\n  tenant: {a}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(table(result))
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0 if all(g["row"]["pass"] for per_t in result["tenants"].values() for g in per_t.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
