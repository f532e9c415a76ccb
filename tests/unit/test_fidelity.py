"""phi3mlflow.fidelity's numpy core: KL divergence, top-1 agreement and perplexity ratio, whole and streamed."""

import math

import numpy as np
import pytest

from phi3mlflow.fidelity import Accumulator, Fidelity, compare, log_softmax


def _random(rng, positions, vocab=7, scale=3.0):
    return rng.normal(scale=scale, size=(positions, vocab))


def test_identical_distributions_are_a_perfect_match():
    rng = np.random.default_rng(0)
    ref = [log_softmax(_random(rng, n)) for n in (3, 5, 1)]
    targets = [rng.integers(0, 7, size=len(r)) for r in ref]
    f = compare(ref, [r.copy() for r in ref], targets)
    assert f.kld_mean == f.kld_p99 == f.kld_max == 0.0
    assert f.top1_agreement == 1.0
    assert f.ppl_ratio == pytest.approx(1.0, abs=1e-15)
    assert f.positions == 9


def test_logits_and_log_probabilities_give_the_same_figures():
    rng = np.random.default_rng(1)
    ref, cand = _random(rng, 4), _random(rng, 4)
    targets = rng.integers(0, 7, size=4)
    raw = compare([ref], [cand + 5.0], [targets])
    normalised = compare([log_softmax(ref)], [log_softmax(cand)], [targets])
    for name, value in raw.metrics().items():
        assert value == pytest.approx(normalised.metrics()[name], rel=1e-12)


def test_hand_computed_three_token_example():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    expected = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    f = compare([np.log(p)[None]], [np.log(q)[None]], [np.array([1])])
    assert f.kld_mean == pytest.approx(expected, rel=1e-12)
    assert f.kld_mean == f.kld_p99 == f.kld_max
    assert f.top1_agreement == 0.0  # token 0 against token 1
    assert f.ppl_ratio == pytest.approx(0.3 / 0.5, rel=1e-12)  # exp(-log 0.5) / exp(-log 0.3)
    assert f.positions == 1


def test_a_token_the_reference_rules_out_adds_nothing():
    p = np.array([[0.0, 0.25, 0.75]])
    q = np.array([[0.5, 0.25, 0.25]])
    with np.errstate(divide="ignore"):
        f = compare([np.log(p)], [np.log(q)], [np.array([2])])
    assert f.kld_mean == pytest.approx(0.75 * math.log(3.0), rel=1e-12)


def test_accumulator_over_sequences_equals_compare():
    rng = np.random.default_rng(2)
    lengths = (4, 1, 6, 3)
    ref = [_random(rng, n) for n in lengths]
    cand = [r + rng.normal(scale=0.5, size=r.shape) for r in ref]
    targets = [rng.integers(0, 7, size=n) for n in lengths]
    acc = Accumulator()
    for r, c, t in zip(ref, cand, targets, strict=True):
        acc.add(r, c, t)
    assert acc.result() == compare(ref, cand, targets)
    # Pooled over positions, not averaged per sequence.
    whole = compare([np.concatenate(ref)], [np.concatenate(cand)], [np.concatenate(targets)])
    for name, value in whole.metrics().items():
        assert acc.result().metrics()[name] == pytest.approx(value, rel=1e-12)


def test_percentile_and_maximum_order():
    rng = np.random.default_rng(3)
    ref = _random(rng, 200)
    cand = ref + rng.normal(scale=1.0, size=ref.shape)
    f = compare([ref], [cand], [rng.integers(0, 7, size=200)])
    assert 0.0 < f.kld_mean <= f.kld_p99 <= f.kld_max
    assert 0.0 < f.top1_agreement < 1.0
    rows_kld = np.sum(np.exp(log_softmax(ref)) * (log_softmax(ref) - log_softmax(cand)), axis=-1)
    assert f.kld_p99 == pytest.approx(np.percentile(rows_kld, 99), rel=1e-12)
    assert f.kld_max == pytest.approx(rows_kld.max(), rel=1e-12)


def test_metrics_names():
    f = Fidelity(0.1, 0.2, 0.3, 0.9, 1.01, 10)
    assert f.metrics() == {"kld_mean": 0.1, "kld_p99": 0.2, "kld_max": 0.3, "top1_agreement": 0.9, "ppl_ratio": 1.01}


@pytest.mark.parametrize(
    "ref, cand, targets",
    [
        ([np.zeros((2, 5))], [np.zeros((2, 6))], [np.array([0, 1])]),  # vocabularies differ
        ([np.zeros((2, 5))], [np.zeros((3, 5))], [np.array([0, 1])]),  # positions differ
        ([np.zeros((2, 5))], [np.zeros((2, 5))], [np.array([0, 1, 2])]),  # targets differ
        ([np.zeros((2, 5))], [np.zeros((2, 5))], [np.array([0, 5])]),  # a target outside the vocabulary
        ([np.zeros(5)], [np.zeros(5)], [np.array([0])]),  # not [positions, vocab]
        ([np.zeros((2, 5))], [], []),  # sequence counts differ
    ],
)
def test_mismatches_raise(ref, cand, targets):
    with pytest.raises(ValueError):
        compare(ref, cand, targets)


def test_nothing_measured_is_nan():
    acc = Accumulator()
    acc.skipped = 2
    f = acc.result()
    assert f.positions == 0 and f.skipped == 2
    assert all(math.isnan(v) for v in f.metrics().values())
