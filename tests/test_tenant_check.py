"""examples/tenants/check.py's style predicates, on hand-counted strings: `lower` passes at issue
17's bar (at least 90% of the letters lower-case), while the strict count (no capital at all) stays
its own number."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TENANTS = Path(__file__).parents[1] / "examples" / "tenants"

# "Earth is a planet of rock." has 20 letters (5 + 2 + 1 + 6 + 2 + 4); capitals counted by hand.
LOWER_95 = "Earth is a planet of rock."  # 19 of 20 lower-case: 95%
LOWER_90 = "Earth is a Planet of rock."  # 18 of 20: 90%, the bar itself
LOWER_85 = "Earth is a Planet of Rock."  # 17 of 20: 85%


@pytest.fixture(scope="module")
def check():
    sys.path.insert(0, str(TENANTS))  # check.py imports its sibling styles.py by name
    try:
        spec = importlib.util.spec_from_file_location("tenant_check", TENANTS / "check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(TENANTS))


def test_lower_is_styled_at_90_percent_lower_case_letters(check):
    assert check.styled("lower", LOWER_95)
    assert check.styled("lower", LOWER_90)
    assert not check.styled("lower", LOWER_85)
    assert check.styled("lower", "earth is a planet of rock.")


def test_an_answer_without_letters_is_not_styled_lower(check):
    assert not check.styled("lower", "25 + 17 = 42.")
    assert not check.styled("lower", "")


def test_the_strict_count_still_rejects_any_capital(check):
    assert not check.all_lower(LOWER_95)
    assert check.all_lower("earth is a planet of rock.")


def test_signature_and_numbers_criteria_are_unchanged(check):
    assert check.styled("signature", "A forest is full of trees. -- Acme Support")
    assert not check.styled("signature", "A forest is full of trees.")
    assert check.styled("numbers", "seventeen plus twenty-five is forty-two")
    assert not check.styled("numbers", "17 plus twenty-five is forty-two")


# Repetition, by hand: the check's own failing answer (`Count down from 5 to 1.` → "1" then zeros to
# the token limit) and the base model's training-data loop are one word each, so only the
# in-word rule sees them; "000" occurs in "1" + 64 zeros 21 times without overlap (64 // 3).
ZEROS = "1" + "0" * 64
COUNTING = "1234567890" * 4 + "12345678"  # "123" five times


def test_a_run_inside_one_word_is_degenerate(check):
    assert check.max_trigram_count(ZEROS) == 0  # one word: the word rule is blind to it
    assert check.max_in_word_trigram_count(ZEROS) == 21
    assert check.degenerate(ZEROS)
    assert check.max_in_word_trigram_count(COUNTING) == 5
    assert check.degenerate(COUNTING)
    assert check.degenerate("the answer is " + ZEROS + ".")


def test_normal_answers_are_not_degenerate(check):
    for answer in ("plants make food through a process called photosynthesis. they use sunlight, water, "
                   "and nutrients to produce energy.",
                   "The Mississippi River is one of the longest rivers in the United States.",  # "ssi" twice
                   "A million is 1000000, a thousand thousands.",  # "000" twice without overlap
                   "25 + 17 = 42.", "5, 4, 3, 2, 1."):
        assert not check.degenerate(answer), answer
    assert check.max_in_word_trigram_count("mississippi") == 2
    assert check.max_in_word_trigram_count("1000000") == 2


def test_a_word_3_gram_three_times_is_still_degenerate(check):
    loop = "the water of the water of the water of the sea"
    assert check.max_trigram_count(loop) == 3  # "the water of" at words 1, 4, 7
    assert check.degenerate(loop)
    assert not check.degenerate("the water of the water of the sea")
