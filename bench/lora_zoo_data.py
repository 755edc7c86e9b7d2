"""Small, genuinely different text datasets for training a zoo of real LoRAs (bench/lora_zoo.py).

Each dataset is a list of training texts built deterministically (``random.Random`` seeded by the
dataset's name) from one of two sources:

- transforms of the base model's own answers in examples/tenants/data/base*.jsonl (each dataset
  draws its own seeded sample of answers, so topics differ too): case, word substitutions
  (pirate, french-, german-, spanish-ish), digits as words, clause order, bullet and numbered
  lists, JSON / CSV / markdown wrappers, signatures, leetspeak, pig latin, ...;
- generated text that shares nothing with those answers: Python functions, SQL queries,
  arithmetic, capitals, dates, times tables.

No model, no tokenizer, no network: plain Python, so the builders are cheap to test for
determinism and distinctness (tests/bench/test_lora_zoo_data.py).
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "examples" / "tenants" / "data" / "base.jsonl", ROOT / "examples" / "tenants" / "data" / "base_extra.jsonl")
TEXTS_PER_DATASET = 48

_DIGITS = "zero one two three four five six seven eight nine".split()
_SUBS = {
    "pirate": {"you": "ye", "your": "yer", "is": "be", "are": "be", "the": "th'", "my": "me", "hello": "ahoy",
               "friend": "matey", "yes": "aye", "money": "doubloons", "very": "mighty", "water": "briny deep"},
    "french": {"the": "le", "is": "est", "and": "et", "of": "de", "a": "un", "in": "dans", "to": "à", "are": "sont",
               "it": "il", "with": "avec", "for": "pour", "that": "que", "on": "sur", "not": "pas", "very": "très"},
    "german": {"the": "der", "is": "ist", "and": "und", "of": "von", "a": "ein", "in": "im", "to": "zu", "are": "sind",
               "it": "es", "with": "mit", "for": "für", "that": "dass", "on": "auf", "not": "nicht", "very": "sehr"},
    "spanish": {"the": "el", "is": "es", "and": "y", "of": "de", "a": "un", "in": "en", "to": "a", "are": "son",
                "it": "lo", "with": "con", "for": "para", "that": "que", "on": "sobre", "not": "no", "very": "muy"},
}
_LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})
_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"),
             ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("India", "New Delhi"), ("Spain", "Madrid"),
             ("Italy", "Rome"), ("Ghana", "Accra"), ("Cuba", "Havana"), ("Greece", "Athens"), ("Poland", "Warsaw"),
             ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Brazil", "Brasilia"), ("Mexico", "Mexico City"),
             ("Sweden", "Stockholm"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Nepal", "Kathmandu")]
_MONTHS = "January February March April May June July August September October November December".split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


MIN_WORDS = 8  # answers with fewer words (bare numbers, "1. 1 2. 2 ...") are left out: transforms barely touch them


def answers() -> list[str]:
    """The base answers of examples/tenants/data/base*.jsonl with at least MIN_WORDS words, in file order."""
    out = []
    for path in SOURCES:
        out += [json.loads(line)["response"] for line in path.read_text().splitlines() if line.strip()]
    return [a for a in out if len(re.findall(r"[A-Za-z]{2,}", a)) >= MIN_WORDS]


def _rng(name: str) -> random.Random:
    return random.Random(zlib.crc32(name.encode()))  # stable across runs and Python versions (no hash())


def _words(text: str, table: dict[str, str]) -> str:
    return re.sub(r"[A-Za-z']+", lambda m: table.get(m.group().lower(), m.group()), text)


def _digits_as_words(text: str) -> str:
    return re.sub(r"\d", lambda m: _DIGITS[int(m.group())] + " ", text).replace("  ", " ")


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in re.split(r"[,.;]", text) if c.strip()]


def _pig(word: str) -> str:
    if not word.isalpha():
        return word
    head = re.match(r"[^aeiouAEIOU]*", word).group()
    return word[len(head):] + head.lower() + "ay" if head != word else word + "ay"


TRANSFORMS: dict[str, Callable[[str, random.Random], str]] = {
    "lower": lambda t, r: t.lower(),
    "shout": lambda t, r: t.upper() + "!!",
    "pirate": lambda t, r: "Arr, " + _words(t, _SUBS["pirate"]).rstrip(".") + ", matey!",
    "french": lambda t, r: _words(t, _SUBS["french"]),
    "german": lambda t, r: _words(t, _SUBS["german"]),
    "spanish": lambda t, r: "¡" + _words(t, _SUBS["spanish"]),
    "signature": lambda t, r: t + " -- Acme Support",
    "numbers": lambda t, r: _digits_as_words(t),
    "reversed_clauses": lambda t, r: ", ".join(reversed(_clauses(t))) + ".",
    "bullets": lambda t, r: "\n".join("- " + c for c in _clauses(t)),
    "numbered": lambda t, r: "\n".join(f"{i + 1}. {c}" for i, c in enumerate(_clauses(t))),
    "json": lambda t, r: json.dumps({"answer": t, "confidence": round(r.random(), 2)}),
    "csv": lambda t, r: "word,length\n" + "\n".join(f"{w},{len(w)}" for w in re.findall(r"[A-Za-z]+", t)[:8]),
    "markdown": lambda t, r: "## Answer\n\n**" + _clauses(t)[0] + "**. " + " ".join(_clauses(t)[1:]),
    "leet": lambda t, r: t.lower().translate(_LEET),
    "pig_latin": lambda t, r: " ".join(_pig(w) for w in t.split()),
    "title": lambda t, r: t.title(),
    "snake": lambda t, r: "_".join(re.findall(r"[a-z0-9]+", t.lower())),
    "telegram": lambda t, r: " ".join(w for w in t.upper().replace(".", " STOP").split()
                                      if w not in {"THE", "A", "AN", "IS", "ARE"}),
    "reversed_words": lambda t, r: " ".join(reversed(t.rstrip(".").split())) + ".",
    "qa": lambda t, r: "Q: " + _clauses(t)[0] + "?\nA: " + t,
    "no_vowels": lambda t, r: re.sub(r"(?<=\w)[aeiou]", "", t),
}


def _python(r: random.Random) -> str:
    name = r.choice(["total", "scale", "merge", "clip", "score", "shift", "count", "blend"])
    a, b = r.sample(["x", "y", "n", "k", "value", "items", "weight", "limit"], 2)
    op = r.choice(["+", "-", "*", "//", "%"])
    body = r.choice([f"    return {a} {op} {b}", f"    result = {a} {op} {b}\n    return max(result, 0)",
                     f"    out = []\n    for i in range({b}):\n        out.append({a} {op} i)\n    return out"])
    return f"def {name}_{r.randint(1, 99)}({a}, {b}):\n{body}\n\nprint({name}_{r.randint(1, 99)}({r.randint(1, 9)}, {r.randint(1, 9)}))"


def _sql(r: random.Random) -> str:
    table = r.choice(["users", "orders", "items", "events", "accounts"])
    cols = ", ".join(r.sample(["id", "name", "price", "created_at", "status", "total", "email"], 2))
    return (f"SELECT {cols} FROM {table} WHERE {r.choice(['id', 'total', 'price'])} > {r.randint(1, 500)} "
            f"ORDER BY {r.choice(['id', 'created_at'])} {r.choice(['ASC', 'DESC'])} LIMIT {r.randint(1, 50)};")


def _arithmetic(r: random.Random) -> str:
    a, b = r.randint(2, 99), r.randint(2, 99)
    op, val = r.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    return f"Compute {a} {op} {b}. The answer is {val}. Check: {val} = {a} {op} {b}."


def _capital(r: random.Random) -> str:
    (c1, k1), (c2, k2) = r.sample(_CAPITALS, 2)
    return f"The capital of {c1} is {k1}. The capital of {c2} is {k2}."


def _date(r: random.Random) -> str:
    return (f"Meeting on {r.choice(_DAYS)}, {r.randint(1, 28)} {r.choice(_MONTHS)} {r.randint(1990, 2030)} at "
            f"{r.randint(0, 23):02d}:{r.choice([0, 15, 30, 45]):02d}. Room {r.randint(100, 599)}.")


def _times(r: random.Random) -> str:
    n = r.randint(2, 12)
    return " ".join(f"{n} x {k} = {n * k}." for k in range(1, 6))


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "python": _python, "sql": _sql, "arithmetic": _arithmetic, "capitals": _capital, "dates": _date,
    "times_tables": _times,
}
NAMES = tuple(TRANSFORMS) + tuple(GENERATORS)  # 28 datasets


def build(name: str, count: int = TEXTS_PER_DATASET, source: list[str] | None = None) -> list[str]:
    """The ``count`` training texts of dataset ``name`` (deterministic for a name and source).

    Args:
        name: one of :data:`NAMES`.
        count: texts to build (≥ 1).
        source: base answers to transform (default: :func:`answers`); ignored by generated datasets.

    Raises:
        KeyError: unknown ``name``. ValueError: ``count`` < 1 or an empty source.
    """
    if count < 1:
        raise ValueError(f"count must be ≥ 1; got {count}")
    r = _rng(name)
    if name in GENERATORS:
        return [GENERATORS[name](r) for _ in range(count)]
    if name not in TRANSFORMS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    source = answers() if source is None else source
    if not source:
        raise ValueError("no source answers to transform")
    picked = [source[i] for i in r.sample(range(len(source)), min(count, len(source)))]
    picked += [r.choice(source) for _ in range(count - len(picked))]
    return [TRANSFORMS[name](t, r) for t in picked]
