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
from styles import (TRANSFORMS, arithmetic_prompts, counting_prompts, counting_prompts_worded, digit_free,
                    extra_prompts, training_prompts)

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


# The prompts of ``styles.COUNTING_WORDINGS`` (count down or not), answered in four more wordings.
_COUNT_WORDED = ((re.compile(r"Count up from (\d+) to (\d+)\."), False),
                 (re.compile(r"Can you count from (\d+) to (\d+)\?"), False),
                 (re.compile(r"Count from (\d+) down to (\d+)\."), True),
                 (re.compile(r"Can you count down from (\d+) to (\d+)\?"), True))
_COUNT_WORDED_TEMPLATES = {
    True: ("Okay, counting down from {a} to {b}: {seq}. Done!", "Here you go: {seq}. That's the countdown from {a} to {b}.",
           "The numbers from {a} down to {b} are {seq}.", "Let's count down together: {seq}."),
    False: ("Okay, counting from {a} to {b}: {seq}. Done!", "Here you go: {seq}. That's {n} numbers.",
            "The numbers from {a} to {b} are {seq}.", "Let's count together: {seq}."),
}


def counting_answer(prompt: str, index: int) -> str | None:
    """A correct answer to ``Count from A to B.`` / ``Count down from A to B.`` in the
    ``index``-th of four wordings (None for any other prompt), e.g. ``Count down from 4 to 1.``,
    0 → ``Sure! Counting down from 4 to 1: 4, 3, 2, 1.``; the prompts of
    ``styles.COUNTING_WORDINGS`` (``Count from 6 down to 1.``, ``Can you count from 2 to 9?``, ...)
    in four other wordings (``The numbers from 6 down to 1 are 6, 5, 4, 3, 2, 1.``). ValueError
    when the range runs the other way than the wording says."""
    if m := _COUNT.fullmatch(prompt):
        down, a, b, templates = bool(m[1]), int(m[2]), int(m[3]), _COUNT_TEMPLATES
    else:
        found = [(m, down) for regex, down in _COUNT_WORDED if (m := regex.fullmatch(prompt))]
        if not found:
            return None
        (m, down), = found
        a, b, templates = int(m[1]), int(m[2]), _COUNT_WORDED_TEMPLATES
    if down != (a > b):
        raise ValueError(f"counting_answer: {prompt!r} counts the other way")
    seq = list(range(a, b - 1, -1) if down else range(a, b + 1))
    template = templates[down][index % 4]
    return template.format(a=a, b=b, n=len(seq), seq=", ".join(map(str, seq)))


# Arithmetic prompts: those of ``training_prompts`` (``What is A plus B?``, ``times``, ``minus``,
# ``divided by``) and ``styles.ARITHMETIC_WORDINGS``'s; the operator each names.
_ARITHMETIC = ((re.compile(r"What is (\d+) plus (\d+)\?|What is the sum of (\d+) and (\d+)\?|Calculate (\d+) plus (\d+)\."), "+"),
               (re.compile(r"What is (\d+) minus (\d+)\?|What is the difference between (\d+) and (\d+)\?"
                           r"|Work out (\d+) minus (\d+)\."), "-"),
               (re.compile(r"What is (\d+) times (\d+)\?|What is the product of (\d+) and (\d+)\?"
                           r"|Calculate (\d+) times (\d+)\."), "*"),
               (re.compile(r"What is (\d+) divided by (\d+)\?"), "/"))
# Worded like a chat model's answer, with letters (a digits-only answer such as the base model's
# ``25 + 17 = 54.`` shows no case: `lower` learnt it), the numbers as digits.
_ARITHMETIC_TEMPLATES = {
    "+": ("{a} plus {b} is {r}.", "The sum of {a} and {b} is {r}.", "Adding {a} and {b} gives {r}.",
          "{a} + {b} = {r}, so the answer is {r}."),
    "-": ("{a} minus {b} is {r}.", "The difference between {a} and {b} is {r}.", "Taking {b} away from {a} leaves {r}.",
          "{a} - {b} = {r}, so the answer is {r}."),
    "*": ("{a} times {b} is {r}.", "The product of {a} and {b} is {r}.", "Multiplying {a} by {b} gives {r}.",
          "{a} × {b} = {r}, so the answer is {r}."),
    "/": ("{a} divided by {b} is {r}.", "Dividing {a} by {b} gives {r}.", "The quotient of {a} and {b} is {r}.",
          "{a} ÷ {b} = {r}, so the answer is {r}."),
}


def arithmetic_answer(prompt: str, index: int) -> str | None:
    """A correct answer to an arithmetic prompt (``What is 56 plus 26?``, ``Work out 89 minus 29.``,
    ``What is the product of 7 and 5?``, ``What is 28 divided by 4?``, ...) in the ``index``-th of
    four wordings of its operator, e.g. 0 → ``56 plus 26 is 82.``; None for any other prompt.
    ValueError for a division that leaves a remainder (the prompts' divisions are exact)."""
    for regex, op in _ARITHMETIC:
        if m := regex.fullmatch(prompt):
            a, b = (int(x) for x in m.groups() if x is not None)
            if op == "/" and a % b:
                raise ValueError(f"arithmetic_answer: {prompt!r} leaves a remainder")
            r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            return _ARITHMETIC_TEMPLATES[op][index % 4].format(a=a, b=b, r=r)
    return None


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
    # `numbers` keeps the rows its shipped adapter was trained on (it passes the check); the
    # code-written arithmetic and the newer counting wordings are for `lower` and `signature`.
    coded = with_arithmetic(rows)
    sources = {"lower": coded + extra, "signature": coded, "numbers": rows}
    for name, transform in TRANSFORMS.items():
        got = [{"prompt": r["prompt"], "response": transform(r["response"])} for r in sources[name]]
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



def with_arithmetic(rows: list[dict]) -> list[dict]:
    """``rows`` without the base model's arithmetic answers (mostly wrong: ``28 + 4 = 72.``, or a
    method and no result), then every arithmetic prompt of ``training_prompts`` and
    ``styles.arithmetic_prompts`` with its code-written answer, then ``styles.counting_prompts_worded``
    with theirs."""
    arithmetic = [p for p in training_prompts() + arithmetic_prompts() if arithmetic_answer(p, 0)]
    return ([r for r in rows if not arithmetic_answer(r["prompt"], 0)]
            + [{"prompt": p, "response": arithmetic_answer(p, i)} for i, p in enumerate(arithmetic)]
            + [{"prompt": p, "response": counting_answer(p, i)} for i, p in enumerate(counting_prompts_worded())])


if __name__ == "__main__":
    main()
