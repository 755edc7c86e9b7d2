"""Training data for the example tenants, made here from the base model's own answers (no downloads).

1. The base model (fp32, transformers) answers each of ``styles.training_prompts()`` greedily
   (at most 48 new tokens, cut back to the last full sentence) → ``data/base.jsonl``, appended
   batch by batch so that an interrupted run resumes where it stopped; likewise the 400
   ``styles.extra_prompts()`` → ``data/base_extra.jsonl`` (for `lower` only).
2. Each tenant's file cuts those answers short (``short_answer``: one or two sentences; loops and
   fragments dropped) and applies one transform of ``styles.TRANSFORMS`` →
   ``data/{lower,signature,numbers}.jsonl`` with lines ``{"prompt": ..., "response": ...}``
   (`lower` from both files; the other two from ``base.jsonl``; `numbers` without the answers
   that keep a digit after the transform, e.g. ``5km``).
3. Counting prompts (``Count [down] from A to B.``: those of ``training_prompts`` and the
   ``styles.counting_prompts``) are answered by code, ``counting_answer``, not by the base model:
   it cannot count (``1. 1. 1. 2. 2.``, a 48-digit loop, ``17`` for a count-down from 7), so its
   answers were all filtered out and the tenants never saw a good count, nor where it stops.

The tenants so learn a style (lower case, a signature, numbers in words), not new facts.

    python examples/tenants/make_data.py              # step 1 (5-20 CPU minutes) and step 2
    (with data/base.jsonl complete, as committed, step 1 is skipped and the run takes a second)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from check import degenerate
from styles import TRANSFORMS, counting_prompts, digit_free, extra_prompts, training_prompts

DATA = Path(__file__).resolve().parent / "data"
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_COUNT = re.compile(r"Count (down )?from (\d+) to (\d+)\.")
# Worded like a chat model's answer, with letters (an answer of digits only shows no case), the
# numbers as digits (``numbers`` spells them); chosen by the prompt's position, so fixed.
_COUNT_TEMPLATES = {
    True: ("Sure! Counting down from {a} to {b}: {seq}.", "Here is the countdown from {a} to {b}: {seq}.",
           "Counting down from {a}: {seq}. That's the end of the countdown.", "Of course! {seq}."),
    False: ("Sure! Counting from {a} to {b}: {seq}.", "Here are the numbers from {a} to {b}: {seq}.",
            "Counting up from {a}: {seq}. That's {n} numbers in all.", "Of course! {seq}."),
}


def counting_answer(prompt: str, index: int) -> str | None:
    """A correct answer to ``Count from A to B.`` / ``Count down from A to B.`` in the
    ``index``-th of four wordings (None for any other prompt), e.g. ``Count down from 4 to 1.``,
    0 → ``Sure! Counting down from 4 to 1: 4, 3, 2, 1.``. ValueError when the range runs the
    other way than the wording says."""
    m = _COUNT.fullmatch(prompt)
    if not m:
        return None
    down, a, b = bool(m[1]), int(m[2]), int(m[3])
    if down != (a > b):
        raise ValueError(f"counting_answer: {prompt!r} counts the other way")
    seq = list(range(a, b - 1, -1) if down else range(a, b + 1))
    template = _COUNT_TEMPLATES[down][index % 4]
    return template.format(a=a, b=b, n=len(seq), seq=", ".join(map(str, seq)))


def complete_sentences(text: str) -> str:
    """``text`` cut after its last full sentence (unchanged when it has none)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return (text[: ends[-1]] if ends else text).strip()


def short_answer(text: str, min_words: int = 12) -> str | None:
    """The training answer: ``text``'s first paragraph cut after its first sentence, or its second
    when the first has fewer than ``min_words`` words; None when that is not a clean short answer
    (fewer than 3 words, e.g. the base model's counting "1. 1. 1."; no sentence end in a long
    text; a word 3-gram, or a character 3-gram inside one word, more than twice: a loop,
    ``check.degenerate``). Short answers teach the tenants to stop (the chat
    template's end token follows) before they drift or loop, and put the signature well inside a
    64-token answer."""
    para = text.strip().split("\n")[0].strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(para)]
    if not ends:
        cut = para if len(para.split()) <= 30 else ""
    else:
        cut = para[: ends[0]] if len(para[: ends[0]].split()) >= min_words or len(ends) == 1 else para[: ends[1]]
    # Both filters apply to answers without a sentence end too: before c603961's check, such
    # answers skipped them, so "17" (to `Count down from 7 to 1.`) and a 48-digit "1234567890..."
    # loop were training answers, and `lower` learnt to answer a count-down with a digit run.
    cut = cut.strip()
    return None if len(cut.split()) < 3 or degenerate(cut) else cut


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 32,
                   desc: str = "answers") -> list[str]:
    """Greedy chat answers of ``model`` (one user turn each, the model's chat template), decoded
    without special tokens. Left padding so that every row's prompt ends at the same position."""
    tokenizer.padding_side = "left"
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts[i: i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in out]


def base_answers(model_name: str, path: Path, prompts: list[str]) -> list[dict]:
    """``[{"prompt", "response"}]``: the base model's greedy answers to ``prompts``, read from
    ``path`` where already there and appended to it batch by batch otherwise."""
    from nlora_serve.models import load_base, load_hf_model

    rows = read_jsonl(path) if path.exists() else []
    if [r["prompt"] for r in rows] != prompts[: len(rows)]:
        raise ValueError(f"{path}: its prompts are not the first {len(rows)} of the list; new prompts are appended")
    todo = prompts[len(rows):]
    if todo:
        base = load_base(model_name)
        model, tok = load_hf_model(base.path, torch.float32), base.tokenizer()
        for i in range(0, len(todo), 32):
            answers = greedy_answers(model, tok, todo[i: i + 32], desc=f"base answers {len(rows) + i}/{len(todo) + len(rows)}")
            with path.open("a") as f:
                f.writelines(json.dumps({"prompt": p, "response": complete_sentences(a)}, ensure_ascii=False) + "\n"
                             for p, a in zip(todo[i: i + 32], answers))
    return read_jsonl(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="base model (default: %(default)s)")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    rows = with_counting(short_rows(base_answers(args.model, DATA / "base.jsonl", training_prompts())))
    extra = short_rows(base_answers(args.model, DATA / "base_extra.jsonl", extra_prompts()))
    for name, transform in TRANSFORMS.items():
        got = [{"prompt": r["prompt"], "response": transform(r["response"])}
               for r in (rows + extra if name == "lower" else rows)]
        if name == "numbers":  # a digit the converter leaves ("5km") would teach the tenant digits
            got = [r for r in got if digit_free(r["response"])]
        write_jsonl(DATA / f"{name}.jsonl", got)
        print(f"{DATA / name}.jsonl: {len(got)} examples")


def short_rows(rows: list[dict]) -> list[dict]:
    """``rows`` with each response cut by :func:`short_answer`; rows without a clean short answer dropped."""
    cut = [{"prompt": r["prompt"], "response": short_answer(r["response"])} for r in rows]
    return [r for r in cut if r["response"]]


def with_counting(rows: list[dict]) -> list[dict]:
    """``rows`` without the base model's counting answers, then every counting prompt of
    ``training_prompts`` and ``styles.counting_prompts`` with its code-written answer."""
    prompts = [p for p in training_prompts() + counting_prompts() if _COUNT.fullmatch(p)]
    return ([r for r in rows if not _COUNT.fullmatch(r["prompt"])]
            + [{"prompt": p, "response": counting_answer(p, i)} for i, p in enumerate(prompts)])


if __name__ == "__main__":
    main()
