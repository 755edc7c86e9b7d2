"""bench/fairness_replay.py's step-cost model (issue 20): a step's time in units, hand-computed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from fairness_replay import step_time  # noqa: E402


def cost(row_cost=0.0, prefill_cost=0.0, token_cost=0.0):
    return argparse.Namespace(max_num_seqs=16, row_cost=row_cost, prefill_cost=prefill_cost, token_cost=token_cost)


def test_without_a_row_cost_every_decode_step_is_one_unit():
    assert [step_time(cost(), rows, 0) for rows in (1, 8, 16)] == [1.0, 1.0, 1.0]


def test_a_full_decode_step_is_one_unit_and_each_row_fewer_saves_the_row_cost():
    # tiny-llama on one thread: 1.5 ms + 0.13 ms a row, i.e. 3.56 ms at 16 rows; 10 rows: 2.8 ms
    assert step_time(cost(0.036), 16, 0) == 1.0
    assert step_time(cost(0.036), 10, 0) == pytest.approx(1 - 6 * 0.036)  # 0.784 = 2.79 / 3.56
    assert step_time(cost(0.036), 2.5, 0) == pytest.approx(1 - 13.5 * 0.036)  # a heavy row priced at a half


def test_prefill_terms_add_and_a_step_never_drops_below_a_tenth():
    assert step_time(cost(0.036, 1.0, 0.01), 12, 64) == pytest.approx(1 - 4 * 0.036 + 1 + 0.64)
    assert step_time(cost(0.2), 1, 0) == 0.1  # 1 - 15 x 0.2 < 0
