"""The ambiguity refusal (sdim_tf.rules.ambiguous): SGR's threshold by hand, against scipy's
binomial bound on scores whose error rates are known, and its promise over repeated draws."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from sdim_tf import rejection, rules
from sdim_tf.rules import ambiguous


def _binomial_cdf(errors, n, rate):  # P(Binomial(n, rate) <= errors), term by term
    return sum(math.comb(n, j) * rate**j * (1 - rate)**(n - j) for j in range(errors + 1))


def _upper_bound_by_bisection(errors, n, level):
    """The rate b with P(Binomial(n, b) <= errors) = level (the cdf falls with b)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _binomial_cdf(errors, n, mid) > level else (lo, mid)
    return (lo + hi) / 2


def test_threshold_by_hand():
    # 7 gaps, the two lowest misclassified; max_error 0.5 at confidence 0.7: k = ceil(log2 8)
    # = 3 tests at level 0.3 / 3 = 0.1 each.
    kappa = np.array([0.4, 0.1, 0.7, 0.2, 0.5, 0.3, 0.6])
    wrong = np.array([0, 1, 0, 1, 0, 0, 0], bool)
    # test 1: the 4th lowest gap 0.4 accepts 4, none wrong: 1 - 0.1^(1/4) = 0.438 <= 0.5
    assert 1 - 0.1 ** (1 / 4) <= 0.5
    # test 2: 0.2 accepts 6, one wrong: the bound exceeds 0.5; the search moves up
    assert _upper_bound_by_bisection(1, 6, 0.1) > 0.5
    # test 3: 0.3 accepts 5, none wrong: 1 - 0.1^(1/5) = 0.369 <= 0.5, the lowest kept
    found = ambiguous.selective_threshold(kappa, wrong, max_error=0.5, delta=0.3)
    assert found["threshold"] == 0.3 and found["tests"] == 3
    assert (found["accepted"], found["errors"]) == (5, 0)
    assert found["bound"] == pytest.approx(1 - 0.1 ** (1 / 5), rel=1e-9)
    assert ambiguous.upper_bound(1, 6, 0.1) == pytest.approx(
        _upper_bound_by_bisection(1, 6, 0.1), rel=1e-9)
    # nothing passes: +inf, every answer refused
    assert ambiguous.selective_threshold(kappa, wrong, 0.1, 0.3)["threshold"] == math.inf


def test_tied_gaps_are_accepted_together():
    kappa = np.array([1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    wrong = np.array([1, 0, 0, 0, 0, 0, 0, 0], bool)
    found = ambiguous.selective_threshold(kappa, wrong, max_error=0.3, delta=0.5)
    # 4 tests at 0.125. The first lands inside the block of 2.0 and accepts all of it, 7
    # images, none wrong: 1 - 0.125^(1/7) = 0.257 passes; 1.0 (all 8, one wrong) fails.
    assert found["threshold"] == 2.0 and found["accepted"] == 7
    assert found["bound"] == pytest.approx(1 - 0.125 ** (1 / 7), rel=1e-9)
    assert _upper_bound_by_bisection(1, 8, 0.125) > 0.3


def _draw(rng, m, a=0.6):
    """Gaps uniform on [0, 1], misclassified with probability a (1 - gap)^2: the error rate
    among gaps >= t is a (1 - t)^2 / 3."""
    kappa = rng.uniform(0, 1, m)
    return kappa, rng.uniform(0, 1, m) < a * (1 - kappa) ** 2


def _true_risk(threshold, a=0.6):
    return a * (1 - threshold) ** 2 / 3


def test_threshold_against_scipy_on_known_error_rates():
    r, delta, m = 0.05, 0.05, 4000
    kappa, wrong = _draw(np.random.default_rng(7), m)
    found = ambiguous.selective_threshold(kappa, wrong, r, delta)
    k = math.ceil(math.log2(m + 1))
    theta = found["threshold"]
    n, errors = int((kappa >= theta).sum()), int(wrong[kappa >= theta].sum())
    assert (found["accepted"], found["errors"], found["tests"]) == (n, errors, k)
    # the Clopper-Pearson bound: scipy's beta quantile, where binom's cdf equals delta / k
    bound = stats.beta.ppf(1 - delta / k, errors + 1, n - errors)
    assert found["bound"] == pytest.approx(bound, rel=1e-12) and bound <= r
    assert stats.binom.cdf(errors, n, bound) == pytest.approx(delta / k, rel=1e-6)
    # a boundary of what passes: the next lower gap accepts one more image and fails
    lower = kappa[kappa < theta].max()
    more = kappa >= lower
    assert stats.beta.ppf(1 - delta / k, wrong[more].sum() + 1,
                          more.sum() - wrong[more].sum()) > r
    # the true error rate among the accepted keeps the promise and is not far from r:
    # the best threshold has a true rate of exactly r at 1 - t = sqrt(3 r / 0.6) = 0.5
    assert _true_risk(theta) <= r
    assert 1 - theta > 0.35


def test_promise_holds_over_repeated_draws():
    """500 seeded draws of 1000 held-out gaps: the true error rate among the accepted
    exceeds r in at most delta of them (within 3 standard errors). Choosing by the
    empirical rate alone breaks it."""
    r, confidence, draws, m = 0.05, 0.95, 500, 1000
    delta = 1 - confidence
    rng = np.random.default_rng(20)
    risks, naive, coverages = [], [], []
    for _ in range(draws):
        kappa, wrong = _draw(rng, m)
        theta = ambiguous.selective_threshold(kappa, wrong, r, delta)["threshold"]
        risks.append(_true_risk(theta) if math.isfinite(theta) else 0.0)
        coverages.append(1 - theta if math.isfinite(theta) else 0.0)
        # the lowest gap whose empirical error rate above it is at most r
        order = np.argsort(-kappa)
        rates = np.cumsum(wrong[order]) / np.arange(1, m + 1)
        naive.append(_true_risk(kappa[order][np.flatnonzero(rates <= r).max()]))
    held = (np.array(risks) <= r).mean()
    assert held >= confidence - 3 * math.sqrt(delta * confidence / draws)
    assert np.median(coverages) > 0.25  # not vacuous: the best coverage is 0.5
    assert (np.array(naive) > r).mean() > 2 * delta


def test_rule_on_class_scores_counts_only_images_that_pass():
    rng = np.random.default_rng(3)
    n, c = 3000, 4
    labels = rng.integers(0, c, n)
    scores = rng.normal(size=(n, c))
    scores[np.arange(n), labels] += rng.uniform(0, 4, n)
    thresholds = np.full(c, 0.5)
    result = rules.Ambiguous(max_error=0.1, confidence=0.9).calibrate(scores, labels,
                                                                       thresholds=thresholds)
    ordered = np.sort(scores, 1)
    passed = ordered[:, -1] >= 0.5
    gaps = (ordered[:, -1] - ordered[:, -2])[passed]
    wrong = (scores.argmax(1) != labels)[passed]
    expected = ambiguous.selective_threshold(gaps, wrong, 0.1, 0.1)
    assert float(result.thresholds) == expected["threshold"]
    assert result.record["n"] == passed.sum()
    assert result.record["accepted"] == expected["accepted"]
    json.dumps(result.record)  # JSON-able as it is
    assert result.promise.startswith(
        "at most 10% of the answers it gives are wrong, with 90% confidence, for images drawn "
        f"like the calibration images ({passed.sum()} that passed the unfamiliar threshold")
    # what it promises, on a large fresh draw of the same population
    labels = rng.integers(0, c, 200000)
    fresh = rng.normal(size=(200000, c))
    fresh[np.arange(200000), labels] += rng.uniform(0, 4, 200000)
    decision = rejection.decide(fresh, thresholds, min_gap=result.thresholds)
    accepted = ~decision.rejected.numpy()
    assert (decision.class_ids.numpy()[accepted] != labels[accepted]).mean() <= 0.1
    assert decision.ambiguous.numpy().any() and accepted.mean() > 0.2


def test_calibrate_both_splits_the_held_out_images():
    rng = np.random.default_rng(5)
    n, c = 2001, 3
    labels = rng.integers(0, c, n)
    scores = rng.normal(size=(n, c))
    scores[np.arange(n), labels] += 3
    unfamiliar = rules.SplitConformal(alpha=0.05, confidence=0.9)
    alone, none = rules.calibrate_both(scores, labels, unfamiliar)
    assert none is None
    np.testing.assert_array_equal(alone.thresholds,
                                  unfamiliar.calibrate(scores, labels).thresholds)
    first, second = rules.calibrate_both(scores, labels, unfamiliar,
                                         rules.Ambiguous(max_error=0.1, confidence=0.9))
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    np.testing.assert_array_equal(first.thresholds,
                                  unfamiliar.calibrate(scores[even], labels[even]).thresholds)
    assert first.record["n"] == 1001
    passed = scores[odd].max(1) >= first.thresholds[0]
    assert second.record["n"] == passed.sum()


def test_bad_settings_and_hopeless_data_are_clear_errors():
    with pytest.raises(ValueError, match=r"max_error must lie in \(0, 1\)"):
        rules.Ambiguous(max_error=2.0)
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\)"):
        rules.Ambiguous(confidence=1.0)
    scores = np.array([[1.0, 0.0], [0.0, 1.0]] * 20)
    labels = np.array([1, 0] * 20)  # every answer wrong
    with pytest.raises(rules.CalibrationError,
                       match="no gap threshold keeps the error rate at most 2% .* on 40 "
                             "held-out images .40 misclassified."):
        rules.Ambiguous().calibrate(scores, labels)


def test_minimum_samples_by_hand_and_against_the_search():
    # r = 0.5 at confidence 0.7: m = 7 gives k = 3 tests and a first test accepting 4 images
    # with no error: 1 - 0.1^(1/4) = 0.438 <= 0.5; m = 6 accepts 3: 1 - 0.1^(1/3) = 0.536
    assert ambiguous.minimum_samples(0.5, 0.7) == 7
    assert 1 - 0.1 ** (1 / 4) <= 0.5 < 1 - 0.1 ** (1 / 3)
    for r, confidence in ((0.5, 0.7), (0.02, 0.95), (0.05, 0.9)):
        m = ambiguous.minimum_samples(r, confidence)
        gaps = np.linspace(0, 1, m)  # none misclassified: the most any m images allow
        assert math.isfinite(ambiguous.selective_threshold(
            gaps, np.zeros(m, bool), r, 1 - confidence)["threshold"])
        assert ambiguous.selective_threshold(
            gaps[1:], np.zeros(m - 1, bool), r, 1 - confidence)["threshold"] == math.inf
    # 2%: the first test accepts 263 of 525 at level 0.05 / 10: 1 - 0.005^(1/263) < 0.02
    assert ambiguous.minimum_samples(0.02, 0.95) == 525
    assert 1 - (0.05 / 10) ** (1 / 263) <= 0.02 < 1 - (0.05 / 10) ** (1 / 262)
