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


# validate.py: its per-answer counts and the selection rule, on hand-made answers and rows.
@pytest.fixture(scope="module")
def validate(check):
    sys.path.insert(0, str(TENANTS))
    try:
        spec = importlib.util.spec_from_file_location("tenant_validate", TENANTS / "validate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["tenant_validate"] = module  # its dataclass looks its module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("tenant_validate", None)
        sys.path.remove(str(TENANTS))


def test_validation_styled_reads_lower_strictly_and_reuses_check_for_the_others(validate):
    assert validate.validation_styled("lower", "earth is a planet of rock.")
    assert not validate.validation_styled("lower", LOWER_95)  # one capital: styled by check, not here
    assert not validate.validation_styled("lower", "5 = 10.")  # no letters: shows no case
    assert validate.validation_styled("signature", "A forest. -- Acme Support")
    assert not validate.validation_styled("signature", "A forest. - Acme Support")
    assert not validate.validation_styled("numbers", "5 = 10.")
    assert validate.validation_styled("numbers", "five is less than ten.")


def test_answer_counts_count_an_answer_failing_once(validate):
    answers = ["Trees. -- Acme Support",  # fine
               "Trees.",  # not signed
               ZEROS + " -- Acme Support",  # signed but degenerate
               ZEROS]  # both: one failing answer
    assert validate.answer_counts("signature", answers) == {"answers": 4, "styled": 2, "degenerate": 2, "failing": 3}


def _rows(failing=0, degenerate=0, styled=10, ratio=1.2, answers=10):
    cell = {"answers": answers, "styled": styled, "degenerate": degenerate, "failing": failing, "loss_ratio": ratio}
    return {c: dict(cell) for c in ("split T=0", "split T=1", "worded T=0", "worded T=1")}


def test_choose_takes_the_fewest_failing_among_the_eligible(validate):
    rule = validate.RULES["signature"]
    a, b, c = _rows(failing=1), _rows(failing=0, ratio=1.39), _rows(failing=0, ratio=1.41)  # c: ratio over 1.4
    assert [validate.eligible(rule, r) for r in (a, b, c)] == [True, True, False]
    assert validate.choose(rule, {"a": a, "b": b, "c": c}) == ("b", True)
    d = _rows(styled=8)  # 8/10 styled in every cell: under the 90 % bar
    e = _rows(degenerate=1, failing=1)
    assert not validate.eligible(rule, d) and not validate.eligible(rule, e)
    assert validate.choose(rule, {"a": a, "d": d, "e": e}) == ("a", True)


def test_choose_falls_back_to_the_fewest_degenerate_then_failing(validate):
    rule = validate.RULES["numbers"]
    a = _rows(degenerate=1, failing=1)  # 4 degenerate over the four cells
    b = _rows(failing=3, ratio=1.6)  # none degenerate, 12 failing, ratio over the bar
    c = _rows(failing=2, ratio=1.7)  # none degenerate, 8 failing
    assert validate.choose(rule, {"a": a, "b": b, "c": c}) == ("c", False)
    with pytest.raises(ValueError, match="no candidates"):
        validate.choose(rule, {})


def test_lower_rule_only_bars_greedy_loops_and_the_worded_ratio(validate):
    rule = validate.RULES["lower"]
    sampled_loop = _rows(failing=1)
    for cell in ("split T=1", "worded T=1"):
        sampled_loop[cell]["degenerate"] = 1
    sampled_loop["split T=0"]["loss_ratio"] = 1.45  # the split ratio is no bar for `lower`
    sampled_loop["split T=0"]["styled"] = 5  # nor is a styled count
    assert validate.eligible(rule, sampled_loop)
    greedy_loop = _rows()
    greedy_loop["worded T=0"]["degenerate"] = 1
    assert not validate.eligible(rule, greedy_loop)
