"""examples/tenants: the `numbers` converter and the code-written counting answers, against
hand-written strings (how each number is read aloud in English), and the prompt lists' disjointness
from the quality check's held-out prompts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TENANTS = Path(__file__).parents[1] / "examples" / "tenants"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(TENANTS))  # make_data.py imports its siblings by name
    try:
        loaded = {}
        for name in ("styles", "make_data"):
            spec = importlib.util.spec_from_file_location(f"tenant_{name}", TENANTS / f"{name}.py")
            loaded[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded[name])
        yield loaded
    finally:
        sys.path.remove(str(TENANTS))


# The forms that check 2026-12-05 found `numbers` keeping, and the others its training answers hold.
SPOKEN = [
    ("about 2,500 species", "about two thousand five hundred species"),
    ("around 130°C (257°F)", "around one hundred thirty degrees Celsius (two hundred fifty-seven degrees Fahrenheit)"),
    ("water boils at 100 °C", "water boils at one hundred degrees Celsius"),
    ("a right angle is 90°", "a right angle is ninety degrees"),
    ("covers about 71% of it", "covers about seventy-one percent of it"),
    ("384,400 km away", "three hundred eighty-four thousand four hundred km away"),
    ("pi is 3.14159", "pi is three point one four one five nine"),
    ("0.5 kg", "zero point five kg"),
    ("4.5 billion years", "four point five billion years"),
    ("in 1969.", "in nineteen sixty-nine."),
    ("in 1905 and 1900", "in nineteen oh-five and nineteen hundred"),
    ("in 2023", "in two thousand twenty-three"),
    ("in the 1990s", "in the nineteen nineties"),
    ("1,500 metres, or 1500 m", "one thousand five hundred metres, or fifteen hundred m"),
    ("-89.2°C", "minus eighty-nine point two degrees Celsius"),
    ("7-9 hours", "seven to nine hours"),
    ("$1 or $5.99 or $2 million", "one dollar or five point nine nine dollars or two million dollars"),
    ("the 21st, 2nd, 3rd and 12th", "the twenty-first, second, third and twelfth"),
    ("10,000,000", "ten million"),
    ("25 + 17 = 42.", "twenty-five + seventeen = forty-two."),
]


@pytest.mark.parametrize("text, spoken", SPOKEN)
def test_numbers_are_written_as_they_are_read_aloud(mods, text, spoken):
    assert mods["styles"].numbers_as_words(text) == spoken


def test_numbers_inside_words_or_too_large_are_left(mods):
    f = mods["styles"].numbers_as_words
    assert f("a 5km run") == "a 5km run"
    assert f("1000000000000 stars") == "1000000000000 stars"  # 10**12: beyond number_words
    assert f("COVID-19") == "COVID-nineteen"  # after a hyphen, not a minus sign


@pytest.mark.parametrize("prompt, index, answer", [
    ("Count down from 4 to 1.", 0, "Sure! Counting down from 4 to 1: 4, 3, 2, 1."),
    ("Count down from 10 to 7.", 1, "Here is the countdown from 10 to 7: 10, 9, 8, 7."),
    ("Count down from 3 to 1.", 6, "Counting down from 3: 3, 2, 1. That's the end of the countdown."),
    ("Count from 2 to 4.", 3, "Of course! 2, 3, 4."),
    ("Count from 1 to 3.", 2, "Counting up from 1: 1, 2, 3. That's 3 numbers in all."),
])
def test_counting_answers_are_correct_counts_with_words(mods, prompt, index, answer):
    assert mods["make_data"].counting_answer(prompt, index) == answer


def test_counting_answer_ignores_other_prompts_and_rejects_a_wrong_direction(mods):
    assert mods["make_data"].counting_answer("What is 6 times 7?", 0) is None
    with pytest.raises(ValueError, match="other way"):
        mods["make_data"].counting_answer("Count down from 1 to 4.", 0)


def test_counting_rows_replace_the_base_models_and_hold_no_check_prompt(mods):
    styles, make_data = mods["styles"], mods["make_data"]
    rows = make_data.with_counting([{"prompt": "Count down from 7 to 1.", "response": "17"},
                                    {"prompt": "What is a star?", "response": "A star is a sun."}])
    prompts = [r["prompt"] for r in rows]
    assert prompts.count("Count down from 7 to 1.") == 1 and "17" not in [r["response"] for r in rows]
    assert len(rows) == 1 + 18 + 18  # 10 + 8 counting prompts of training_prompts, 18 more
    assert not set(prompts) & set(styles.HELD_OUT + styles.VALIDATION_WORDED)
    assert not set(styles.FACTS) & set(styles.HELD_OUT + styles.VALIDATION_WORDED)
