"""examples/tenants: the `numbers` converter and the code-written counting answers, against
hand-written strings (how each number is read aloud in English), and the prompt lists' disjointness
from the quality check's held-out prompts."""

from __future__ import annotations

import importlib.util
import re
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


# Results worked out by hand; one of each operator's four wordings at least.
@pytest.mark.parametrize("prompt, index, answer", [
    ("What is 56 plus 26?", 0, "56 plus 26 is 82."),
    ("What is the sum of 19 and 74?", 1, "The sum of 19 and 74 is 93."),
    ("Calculate 28 plus 14.", 2, "Adding 28 and 14 gives 42."),
    ("What is 18 plus 34?", 7, "18 + 34 = 52, so the answer is 52."),
    ("What is 83 minus 12?", 0, "83 minus 12 is 71."),
    ("What is the difference between 94 and 31?", 1, "The difference between 94 and 31 is 63."),
    ("Work out 65 minus 58.", 2, "Taking 58 away from 65 leaves 7."),
    ("What is 12 times 7?", 3, "12 × 7 = 84, so the answer is 84."),
    ("What is the product of 14 and 9?", 0, "14 times 9 is 126."),
    ("Calculate 12 times 13.", 2, "Multiplying 12 by 13 gives 156."),
    ("What is 88 divided by 8?", 0, "88 divided by 8 is 11."),
    ("What is 28 divided by 4?", 2, "The quotient of 28 and 4 is 7."),
])
def test_arithmetic_answers_are_correct_with_words(mods, prompt, index, answer):
    assert mods["make_data"].arithmetic_answer(prompt, index) == answer


def test_arithmetic_answer_ignores_other_prompts_and_rejects_a_remainder(mods):
    f = mods["make_data"].arithmetic_answer
    assert f("How many days are in a week?", 0) is None and f("Count from 1 to 5.", 0) is None
    with pytest.raises(ValueError, match="remainder"):
        f("What is 7 divided by 2?", 0)


@pytest.mark.parametrize("prompt, index, answer", [
    ("Count from 6 down to 1.", 2, "The numbers from 6 down to 1 are 6, 5, 4, 3, 2, 1."),
    ("Can you count down from 10 to 2?", 0, "Okay, counting down from 10 to 2: 10, 9, 8, 7, 6, 5, 4, 3, 2. Done!"),
    ("Count up from 3 to 8.", 1, "Here you go: 3, 4, 5, 6, 7, 8. That's 6 numbers."),
    ("Can you count from 2 to 9?", 3, "Let's count together: 2, 3, 4, 5, 6, 7, 8, 9."),
])
def test_counting_answers_in_the_newer_wordings(mods, prompt, index, answer):
    assert mods["make_data"].counting_answer(prompt, index) == answer


@pytest.mark.parametrize("answer, spoken", [
    ("56 plus 26 is 82.", "fifty-six plus twenty-six is eighty-two."),
    ("18 + 34 = 52, so the answer is 52.", "eighteen + thirty-four = fifty-two, so the answer is fifty-two."),
    ("94 - 31 = 63, so the answer is 63.", "ninety-four - thirty-one = sixty-three, so the answer is sixty-three."),
    ("12 × 13 = 156, so the answer is 156.",
     "twelve × thirteen = one hundred fifty-six, so the answer is one hundred fifty-six."),
])
def test_arithmetic_answers_read_aloud(mods, answer, spoken):
    assert mods["styles"].numbers_as_words(answer) == spoken


def test_arithmetic_rows_replace_the_base_models_and_share_no_wording_with_checked_prompts(mods):
    styles, make_data = mods["styles"], mods["make_data"]
    rows = make_data.with_arithmetic([{"prompt": "What is 28 plus 4?", "response": "28 + 4 = 72."},
                                      {"prompt": "What is a star?", "response": "A star is a sun."}])
    responses = {r["prompt"]: r["response"] for r in rows}
    assert len(rows) == 1 + 15 + 15 + 10 + 6 + 36 + 16 == len(responses)  # the base row of 28 + 4 replaced
    assert responses["What is 28 plus 4?"] != "28 + 4 = 72." and responses["What is a star?"] == "A star is a sun."
    new = styles.arithmetic_prompts() + styles.counting_prompts_worded()
    checked = styles.HELD_OUT + styles.VALIDATION_WORDED
    assert not set(responses) & set(checked)
    assert not {styles.template(p) for p in new} & {styles.template(p) for p in checked}
    assert styles.template("What is 25 plus 17?") == "What is N plus N?"
    for prompt in new[:36]:  # every new arithmetic answer: its stated result is right, checked by eval
        a, b = map(int, re.findall(r"\d+", prompt))
        op = "+" if "plus" in prompt or "sum" in prompt else "-" if "minus" in prompt or "difference" in prompt else "*"
        assert responses[prompt].rstrip(".").endswith(f" {eval(f'{a} {op} {b}')}")
    for prompt in new:  # letters in every answer (`lower` has a case to show), digits gone when read aloud
        assert any(c.isalpha() for c in responses[prompt])
        assert styles.digit_free(styles.numbers_as_words(responses[prompt]))
