"""The three example tenants' behaviours: prompts, answer transforms and the metrics that check them.

Pure Python (no model): ``make_data.py`` applies the transforms to the base model's own answers,
``check.py`` measures the metrics on greedy answers. The tenants learn a style, not new facts.
"""

from __future__ import annotations

import random
import re

SIGNATURE = " -- Acme Support"
LOWER_SHARE_MIN = 0.9  # issue 17: a tenant shows its style in >= 90% of its letters
TOPICS = [
    "the ocean", "volcanoes", "photosynthesis", "the moon", "honey bees", "rainbows", "the internet",
    "bicycles", "coffee", "the human heart", "glaciers", "chess", "the piano", "electricity", "deserts",
    "penguins", "recycling", "the Roman Empire", "clouds", "tea", "sleep", "trees", "gravity", "airplanes",
    "bread", "earthquakes", "vaccines", "the Great Wall of China", "dolphins", "solar panels", "music",
    "libraries", "football", "mountains", "batteries", "butterflies", "rivers", "the sun", "computers", "maps",
]
TEMPLATES = [
    "What is {t}?", "Tell me one interesting fact about {t}.", "Why is {t} important?",
    "Describe {t} in one sentence.", "What should a child know about {t}?",
]
COUNTS = [
    "days are in a week", "hours are in a day", "minutes are in an hour", "seconds are in a minute",
    "months are in a year", "legs does a spider have", "sides does a hexagon have", "players are on a soccer team",
    "planets are in the solar system", "continents are there", "cents are in a dollar", "weeks are in a year",
    "days are in a leap year", "strings does a guitar have", "keys does a piano have",
    "degrees are in a right angle", "legs does an insect have", "sides does a triangle have",
    "hours are in a week", "centimeters are in a meter",
]
# Held out of every training file: the checks run on these.
EVAL_GENERAL = [
    "What is a star?", "Tell me one interesting fact about elephants.", "Why is snow white?",
    "Describe pizza in one sentence.", "What should a child know about the brain?", "What is a train?",
    "Why is wind important?", "Tell me one interesting fact about paper.", "What is a lighthouse?",
    "Describe a forest in one sentence.",
]
EVAL_NUMERIC = [
    "What is 14 plus 23?", "What is 6 times 7?", "How many days are in a year?", "How many wheels does a car have?",
    "What is 45 plus 12?", "How many sides does a square have?", "What is 9 times 8?", "Count from 1 to 5.",
    "How many hours are in two days?", "What is 30 plus 41?",
]

# The quality check's 20 held-out prompts (bench/tenant_quality.py), fixed before the tenants were
# retrained and in no training file: the README's three demo prompts, eleven general questions and
# six with numbers in their answer. Every tenant is checked on all twenty.
HELD_OUT = [
    "How do plants make food?", "What is a forest?", "Name three rivers.",
    "What is a volcano made of?", "Why do birds migrate?", "Describe the sea in one sentence.",
    "What is a museum?", "Tell me one interesting fact about owls.", "Why is exercise good for you?",
    "What should a child know about fire?", "What is a bridge?", "Why do leaves change colour in autumn?",
    "Describe a city at night in one sentence.", "What is cheese made from?",
    "How many legs does a dog have?", "What is 25 plus 17?", "How many days are in two weeks?",
    "What is 8 times 6?", "How many minutes are in two hours?", "Count down from 5 to 1.",
]

# Validation prompts for choosing a recipe (``validate.py``), added after check c603961 found
# `lower` answering `Count down from 5 to 1.` with "1" and 64 zeros: worded unlike every training
# template (the tune split's 68 prompts are all template-worded, and a loop there showed only on
# the check's differently worded prompts), half of them counting or arithmetic. None is a
# HELD_OUT prompt or about a HELD_OUT topic; none is in a training file (``extra_prompts`` asserts).
VALIDATION_WORDED = [
    "Count backwards from 6 to 2.", "Please count down from ten.", "List the numbers from 1 to 4.",
    "Say the numbers from 8 down to 5.", "Count to three.", "What number comes after 19?",
    "Add 13 and 9.", "What do you get if you multiply 7 by 3?", "Subtract 5 from 20.",
    "How much is 100 minus 1?", "What is half of 50?", "How many zeros are in one thousand?",
    "Explain how rain forms.", "Give me a short description of a bakery.", "What does a firefighter do?",
    "Who lives in a castle?", "Where do penguins live?", "Write one sentence about the night sky.",
    "What happens when water boils?", "Can you tell me why the sky is blue?", "What do bees make?",
    "What is a library for?", "Who was Albert Einstein?", "Name a famous painting.",
]


def training_prompts(seed: int = 0) -> list[str]:
    """200 general prompts (topics × templates), 92 numeric ones (sums, products, counts, counting,
    differences, quotients, unit conversions) and the 48 ``FACTS``, in a fixed order for a given seed."""
    rng = random.Random(seed)
    prompts = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES]
    prompts += [f"What is {rng.randint(2, 60)} plus {rng.randint(2, 60)}?" for _ in range(15)]
    prompts += [f"What is {rng.randint(2, 12)} times {rng.randint(2, 12)}?" for _ in range(15)]
    prompts += [f"How many {c}?" for c in COUNTS]
    prompts += [f"Count from 1 to {n}." for n in range(3, 13)]
    # Added with the short-answer recipe: prompts whose answer restates their numbers, so the
    # `numbers` tenant learns to spell a number it copies from the prompt (appended: the rows
    # above and their base answers stay as they were). None is a HELD_OUT prompt.
    prompts += [f"Count down from {n} to 1." for n in (3, 4, 6, 7, 8, 9, 10, 12)]
    prompts += [f"What is {rng.randint(20, 90)} minus {rng.randint(2, 19)}?" for _ in range(10)]
    prompts += [f"How many days are in {n} weeks?" for n in range(3, 7)]
    prompts += [f"How many minutes are in {n} hours?" for n in range(3, 7)]
    prompts += [f"What is {rng.randint(2, 12) * d} divided by {d}?" for d in (2, 3, 4, 5, 6, 8)]
    prompts += FACTS  # appended after the check of 2026-12-05 (see FACTS); earlier rows unchanged
    assert not set(prompts) & set(HELD_OUT + VALIDATION_WORDED)
    return prompts


# Fact questions whose answers hold numbers as the base model writes them (thousands separators,
# decimals, percentages, temperatures, years), so that `numbers` sees each form put into words:
# check 2026-12-05 found it keeping "2,500" and "130°C (257°F)". None is on a topic of HELD_OUT,
# EVAL_* or VALIDATION_WORDED (no rivers, birds, fire, water boiling, stars ...).
FACTS = [
    "How far is the Moon from Earth?", "How far is the Sun from Earth?", "How tall is Mount Everest?",
    "What is the speed of light?", "How fast does sound travel in air?", "How many bones are in the human body?",
    "How many people live on Earth?", "How old is the Earth?", "How old is the universe?",
    "What is the population of Japan?", "What is the population of Canada?", "How big is Australia?",
    "How long is a marathon?", "How heavy is a blue whale?", "How fast can a cheetah run?",
    "What is the value of pi?", "How many kilometres are in a mile?", "How many pounds are in a kilogram?",
    "What is normal human body temperature?", "How hot is the surface of the Sun?",
    "How hot is the surface of Venus?", "At what temperature does iron melt?",
    "What is the coldest temperature ever recorded on Earth?", "How cold is the South Pole in winter?",
    "What is the melting point of gold?", "How hot does an oven get for baking?",
    "What percentage of the Earth is covered by water?", "What percentage of the air is oxygen?",
    "What percentage of the human body is water?", "How much of the Earth's surface is land?",
    "When did humans first land on the Moon?", "When was the printing press invented?",
    "When did World War II end?", "When was the telephone invented?", "In what year did the Titanic sink?",
    "When was the Eiffel Tower built?", "When did Christopher Columbus reach America?",
    "When was the first airplane flight?", "When did the Berlin Wall fall?", "How long is the Great Wall of China?",
    "How tall is the Eiffel Tower?", "How deep is Lake Baikal?", "How much does a human heart weigh?",
    "How many hairs are on a human head?", "How many languages are spoken in the world?",
    "How many satellites orbit the Earth?", "How far can a kangaroo jump?", "How many calories does an adult need a day?",
]


def counting_prompts() -> list[str]:
    """Counting prompts answered by code (``make_data.counting_answer``), not by the base model,
    which cannot count (``1. 1. 1. 2. 2.``, a 48-digit loop, ``17`` for a count-down from 7):
    other ranges than the count prompts of :func:`training_prompts`, the same two wordings, none
    a HELD_OUT or VALIDATION_WORDED prompt."""
    down = [(11, 1), (15, 1), (20, 1), (10, 5), (9, 4), (12, 8), (15, 10), (20, 15), (7, 3), (8, 2)]
    up = [(2, 6), (4, 9), (5, 10), (10, 15), (3, 8), (6, 11), (20, 25), (15, 20)]
    prompts = [f"Count down from {a} to {b}." for a, b in down] + [f"Count from {a} to {b}." for a, b in up]
    assert not set(prompts) & set(HELD_OUT + VALIDATION_WORDED + EVAL_NUMERIC + training_prompts())
    return prompts


# Added after check 3f9b0a9 (`lower` greedy: `What is 25 plus 17?` -> `25 + 17 = 54.`, no letters;
# the validation's loops on arithmetic and counting prompts worded unlike training): arithmetic and
# counting prompts in wordings of their own, answered by code (``make_data.arithmetic_answer``,
# ``make_data.counting_answer``) with words in the answer, for `lower` and `signature`. No wording
# is that of a HELD_OUT or VALIDATION_WORDED prompt (``template``), and no number pair is one of theirs.
ARITHMETIC_WORDINGS = {
    "+": ("What is the sum of {a} and {b}?", "Calculate {a} plus {b}."),
    "-": ("What is the difference between {a} and {b}?", "Work out {a} minus {b}."),
    "*": ("What is the product of {a} and {b}?", "Calculate {a} times {b}."),
}
COUNTING_WORDINGS = {
    False: ("Count up from {a} to {b}.", "Can you count from {a} to {b}?"),
    True: ("Count from {a} down to {b}.", "Can you count down from {a} to {b}?"),
}


def template(prompt: str) -> str:
    """``prompt`` with every number replaced by ``N``: its wording (``What is N plus N?``)."""
    return re.sub(r"\d+", "N", prompt)


def _checked_numbers() -> set[frozenset[int]]:
    """The sets of numbers in the HELD_OUT and VALIDATION_WORDED prompts (``{25, 17}``, ...)."""
    return {frozenset(map(int, re.findall(r"\d+", p))) for p in HELD_OUT + VALIDATION_WORDED}


def arithmetic_prompts(seed: int = 1) -> list[str]:
    """36 arithmetic prompts (6 per wording of ``ARITHMETIC_WORDINGS``): sums of numbers from 2 to
    99, differences a - b > 0 of numbers from 2 to 99, products of numbers from 2 to 15; fixed for a
    given seed. None shares a wording or its pair of numbers with a HELD_OUT or VALIDATION_WORDED prompt."""
    rng, taken, prompts = random.Random(seed), _checked_numbers(), []
    ranges = {"+": (2, 99), "-": (2, 99), "*": (2, 15)}
    for op, wordings in ARITHMETIC_WORDINGS.items():
        for wording in wordings:
            pairs = []
            while len(pairs) < 6:
                a, b = rng.randint(*ranges[op]), rng.randint(*ranges[op])
                a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
                if a != b and frozenset((a, b)) not in taken:
                    taken.add(frozenset((a, b)))
                    pairs.append((a, b))
            prompts += [wording.format(a=a, b=b) for a, b in pairs]
    checked = {template(p) for p in HELD_OUT + VALIDATION_WORDED}
    assert not {template(p) for p in prompts} & checked
    assert not set(prompts) & set(HELD_OUT + VALIDATION_WORDED + EVAL_NUMERIC + training_prompts())
    return prompts


def counting_prompts_worded() -> list[str]:
    """16 counting prompts in the four ``COUNTING_WORDINGS`` (4 ranges each), none of their ranges
    or wordings that of a HELD_OUT or VALIDATION_WORDED prompt."""
    ranges = {False: [(1, 6), (3, 8), (7, 12), (11, 16), (2, 9), (9, 14), (12, 18), (4, 8)],
              True: [(6, 1), (8, 3), (13, 8), (16, 11), (10, 2), (14, 7), (18, 12), (11, 6)]}
    prompts = [w.format(a=a, b=b) for down, wordings in COUNTING_WORDINGS.items()
               for i, w in enumerate(wordings) for a, b in ranges[down][4 * i: 4 * i + 4]]
    taken = _checked_numbers()
    assert not any(frozenset(map(int, re.findall(r"\d+", p))) in taken for p in prompts)
    assert not {template(p) for p in prompts} & {template(p) for p in HELD_OUT + VALIDATION_WORDED}
    assert not set(prompts) & set(training_prompts() + counting_prompts() + EVAL_NUMERIC)
    return prompts


# Added for `lower` only (more names and places to lower-case than the other prompts give): 80 more
# topics, none of them a topic of HELD_OUT or EVAL_* (no plants, forests, rivers, birds, owls, fire,
# cities, stars, elephants, snow ...), under the same five templates.
EXTRA_TOPICS = [
    "whales", "ants", "frogs", "sharks", "tigers", "wolves", "lakes", "islands", "caves", "the Arctic",
    "tornadoes", "thunderstorms", "hurricanes", "the seasons", "oxygen", "water", "salt", "iron", "gold",
    "diamonds", "magnets", "light", "sound", "the telephone", "television", "radio", "cameras", "robots",
    "rockets", "satellites", "Mars", "Jupiter", "comets", "the alphabet", "poetry", "painting", "dance",
    "the theatre", "the Olympic Games", "basketball", "swimming", "running", "gardens", "farming", "rice",
    "apples", "chocolate", "eggs", "vegetables", "soap", "clocks", "money", "banks", "schools",
    "hospitals", "doctors", "teachers", "friendship", "kindness", "the pyramids of Egypt",
    "ancient Greece", "the printing press", "the wheel", "cars", "ships", "roads", "umbrellas", "shoes",
    "cotton", "glass", "plastic", "wood", "horses", "cats", "spiders", "salmon", "ocean currents",
    "the calendar", "beeswax", "kites",
]


def extra_prompts() -> list[str]:
    """400 more topic prompts (``EXTRA_TOPICS`` × the five templates), for the `lower` tenant only."""
    prompts = [t.format(t=topic) for topic in EXTRA_TOPICS for t in TEMPLATES]
    assert len(prompts) == 400 and not set(prompts) & set(HELD_OUT + EVAL_GENERAL + EVAL_NUMERIC + training_prompts())
    assert not set(VALIDATION_WORDED) & set(prompts + HELD_OUT + training_prompts())
    return prompts


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1000, "thousand"), (100, "hundred"))


def number_words(n: int) -> str:
    """English words for 0 <= n < 10**12, e.g. 1203 → 'one thousand two hundred three'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    for size, name in _SCALES:
        if n >= size:
            rest = n % size
            return f"{number_words(n // size)} {name}" + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError(n)


_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
            "nine": "ninth", "twelve": "twelfth"}


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    sep = "-" if "-" in last else ""
    stem_head, _, stem = last.rpartition("-") if sep else ("", "", last)
    if stem in _ORDINAL:
        stem = _ORDINAL[stem]
    else:
        stem = stem[:-1] + "ieth" if stem.endswith("y") else stem + "th"
    last = f"{stem_head}-{stem}" if sep else stem
    return f"{head} {last}" if head else last


# A number as the base model writes it: an optional "$" or minus sign, digits (with thousands
# separators or without), a decimal part, an ordinal or plural suffix ("3rd", "1990s"), then an
# optional unit read aloud ("%", "°C", "°F", "°") and, after "$", a scale word ("$1.5 million").
_NUMBER = re.compile(r"(?<![\w.])(?P<cur>\$)?(?P<neg>[-−](?=\d))?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?"
                     r"(?P<suf>st|nd|rd|th|s)?\b(?P<unit>\s?%|\s?°\s?[CF]\b|\s?°)?"
                     r"(?P<scale> (?:thousand|million|billion|trillion)\b)?")
_RANGE = re.compile(r"(?<=\d)[-–](?=\d)")  # "5-10" → "5 to 10"
_UNITS = {"%": "percent", "°C": "degrees Celsius", "°F": "degrees Fahrenheit", "°": "degrees"}


def _pairs(n: int) -> str:
    """1100 <= n <= 1999 read as two pairs, as years and round quantities are said: 1969 → 'nineteen
    sixty-nine', 1900 → 'nineteen hundred', 1905 → 'nineteen oh-five'."""
    head, tail = number_words(n // 100), n % 100
    return f"{head} hundred" if tail == 0 else f"{head} oh-{_ONES[tail]}" if tail < 10 else f"{head} {number_words(tail)}"


def _plural(words: str) -> str:
    return words[:-1] + "ies" if words.endswith("y") else words + ("es" if words.endswith(("x", "s")) else "s")


def _spell(m: re.Match) -> str:
    digits = m["int"].replace(",", "")
    whole = int(digits)
    if whole >= 10**12:
        return m.group(0)
    paired = "," not in m["int"] and len(digits) == 4 and 1100 <= whole <= 1999 and not m["frac"]
    words = _pairs(whole) if paired and m["suf"] in (None, "s") else number_words(whole)
    if m["suf"] == "s":
        words = _plural(words)
    elif m["suf"]:
        words = _ordinal(words)
    if m["frac"]:
        words += " point " + " ".join(_ONES[int(d)] for d in m["frac"][1:])
    if m["neg"]:
        words = "minus " + words
    if m["unit"]:
        words += " " + _UNITS[re.sub(r"\s", "", m["unit"])]
    scale = m["scale"] or ""
    if m["cur"]:
        return words + scale + (" dollar" if whole == 1 and not m["frac"] and not scale else " dollars")
    return words + scale


def to_lower(answer: str) -> str:
    """Tenant ``lower``: the answer in lower case (no capital letter left, 'I' and names included)."""
    return answer.lower()


def with_signature(answer: str) -> str:
    """Tenant ``signature``: the answer followed by :data:`SIGNATURE`."""
    return answer.rstrip() + SIGNATURE


def numbers_as_words(answer: str) -> str:
    """Tenant ``numbers``: every number written in words, as it would be read aloud: '12.5' → 'twelve
    point five', '3rd' → 'third', '2,500' → 'two thousand five hundred', '1969' → 'nineteen
    sixty-nine', '71%' → 'seventy-one percent', '130°C' → 'one hundred thirty degrees Celsius',
    '-40' → 'minus forty', '5-10' → 'five to ten', '$3' → 'three dollars'. Numbers of 10**12 or
    more, and digits inside a word ('COVID-19' aside, 'A4', '5km'), are left as they are."""
    return _NUMBER.sub(_spell, _RANGE.sub(" to ", answer))


TRANSFORMS = {"lower": to_lower, "signature": with_signature, "numbers": numbers_as_words}


def upper_share(text: str) -> float:
    """Upper-case letters / letters (0.0 for a text without letters)."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def all_lower(text: str) -> bool:
    """Whether ``text`` has no upper-case letter at all (True for a text without letters)."""
    return not any(c.isupper() for c in text)


def mostly_lower(text: str, min_share: float = LOWER_SHARE_MIN) -> bool:
    """Whether at least ``min_share`` of the letters of ``text`` are lower-case: the style of ``lower``
    by issue 17's bar ("`upper` ≥ 90% capital letters", mirrored). False for a text without letters:
    it shows no case at all, so an empty or digits-only answer cannot pass as styled. (Rounded
    division is monotonic, so 18 lower-case letters of 20 meet 0.9 exactly.)"""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.islower() for c in letters) / len(letters) >= min_share


def has_signature(text: str) -> bool:
    """Whether ``text`` ends with the signature (trailing whitespace ignored)."""
    return text.rstrip().endswith(SIGNATURE.strip())


def digit_free(text: str) -> bool:
    """Whether ``text`` has no ASCII digit (every number written as words)."""
    return not any(c.isdigit() for c in text)
