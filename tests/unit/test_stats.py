"""Paired statistics: the bootstrap interval and the exact McNemar test, on hand-checkable cases."""

from __future__ import annotations

import json
import math

import pytest

from phi3mlflow.evaluation import stats


def test_mcnemar_is_the_exact_two_sided_binomial_test():
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(5, 5) == 1.0
    # 0 of 6 discordant questions for b: 2 * 0.5**6.
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 * 0.5**6)
    # 1 vs 9: 2 * (C(10,0) + C(10,1)) / 2**10.
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert stats.mcnemar_exact(9, 1) == stats.mcnemar_exact(1, 9)


def test_a_difference_inside_the_noise_is_no_difference():
    # 132 questions, 3 more right (5 won, 2 lost): the README's int8 "win" over fp32.
    a = [1] * 80 + [1] * 5 + [0] * 2 + [0] * 45
    b = [1] * 80 + [0] * 5 + [1] * 2 + [0] * 45
    p = stats.paired(a, b)
    assert p.delta == pytest.approx(3 / 132, abs=1e-6)
    assert p.low < 0 < p.high and not p.better and not p.worse
    assert p.a_only == 5 and p.b_only == 2 and p.p_value == pytest.approx(2 * (1 + 7 + 21) / 128)
    # All three in one direction: the interval touches 0 and still is no evidence.
    one_way = stats.paired([1] * 3 + [0] * 129, [0] * 132)
    assert one_way.low == 0.0 and not one_way.better


def test_a_clear_difference_is_significant_either_way():
    a = [1] * 90 + [0] * 10
    b = [1] * 50 + [0] * 50
    assert stats.paired(a, b).better and stats.paired(b, a).worse
    assert stats.paired(a, b).p_value < 1e-6


def test_the_same_answers_give_the_same_interval_byte_for_byte():
    a = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 7
    b = [1, 1, 0, 1, 0, 1, 1, 1, 0, 1] * 7
    first, second = stats.paired(a, b), stats.paired(list(a), list(b))
    assert json.dumps(first.to_dict()) == json.dumps(second.to_dict())
    assert stats.interval(a) == stats.interval(list(a))


def test_identical_candidates_tie_exactly():
    a = [1, 0, 1] * 20
    p = stats.paired(a, a)
    assert (p.delta, p.low, p.high, p.p_value, p.a_only, p.b_only) == (0.0, 0.0, 0.0, 1.0, 0, 0)


def test_f1_scores_pair_without_mcnemar():
    p = stats.paired([0.5, 1.0, 0.25] * 10, [0.5, 0.5, 0.25] * 10)
    assert p.delta == pytest.approx(1 / 6, abs=1e-6) and p.p_value == 1.0 and p.a_only == p.b_only == 0


def test_categories_get_a_comparison_only_with_enough_questions():
    cats = ["big"] * stats.MIN_CATEGORY_QUESTIONS + ["small"] * 5
    a = [1] * len(cats)
    found = stats.by_category(a, [0] * len(cats), cats)
    assert set(found) == {"big"} and found["big"].better


def test_the_text_gives_the_interval_and_the_discordant_counts():
    text = stats.paired([1, 0] * 20, [0, 1] * 20).text()
    assert text.startswith("Δ accuracy +0.000, 95 % CI -") and "McNemar p=" in text and "(20 vs 20 questions)" in text


def test_unpaired_lengths_are_refused():
    with pytest.raises(ValueError):
        stats.paired([1, 0], [1])
    assert not math.isnan(stats.interval([1, 0, 1])[0])
