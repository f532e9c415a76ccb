"""Answer grading: aliases, whole words, exact match, F1, and the aggregates evaluate logs."""

from __future__ import annotations

import pytest

from phi3mlflow import metrics


@pytest.mark.parametrize(
    "expected,reply,right",
    [
        ("8 | eight", "The answer is 8.", True),
        ("8 | eight", "The answer is 18.", False),
        ("8 | eight", "Eight!", True),
        ("Paris", "It is paris, France", True),
        ("Paris", "Parisian food", False),
        ("The capital of Spain is Madrid.", "The capital of Spain is Madrid.", True),
        ("H2O | water", "Its formula is H2O.", True),
    ],
)
def test_alias_grading_matches_whole_words(expected, reply, right):
    assert metrics.contains(reply, expected) == float(right)


def test_exact_and_f1_take_the_closest_alias():
    assert metrics.exact("eight", "8 | eight") == 1.0
    assert metrics.token_f1("it is eight", "8 | eight") == pytest.approx(0.5)


def test_rows_and_aggregates_are_the_metrics_evaluate_logs():
    rows = metrics.score_rows(["It is 8.", "eighteen", "Paris"], ["8 | eight", "8 | eight", "Paris"])
    assert rows["accuracy"] == [1.0, 0.0, 1.0] and rows["exact_match"] == [0.0, 0.0, 1.0]
    agg = metrics.aggregate(rows, [10.0, 20.0, 30.0], [3, 4, 5])
    assert agg["accuracy"] == pytest.approx(2 / 3) and agg["latency_p50_ms"] == 20.0
    assert agg["tokens_per_s"] == pytest.approx(12 / 0.06) and set(agg) == set(metrics.METRICS)
