"""Split-conformal thresholds: order statistics by hand and the guarantees by simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from sdim_tf import conformal


def test_marginal_order_statistic_by_hand():
    assert conformal.order_statistic(99, 0.05) == 5  # floor(0.05 * 100)
    assert conformal.order_statistic(5000, 0.04) == 200  # floor(200.04)
    assert conformal.order_statistic(10, 0.05) == 0  # too few to promise 5%
    assert conformal.minimum_samples(0.05) == 19  # floor(0.05 * 20) = 1
    assert conformal.order_statistic(19, 0.05) == 1
    assert conformal.threshold([5.0, 1.0, 3.0, 2.0] * 5, 0.1) == 1.0  # k = 2 of 20
    assert conformal.threshold([1.0, 2.0], 0.1) == -math.inf


def test_high_probability_order_statistic_by_brute_force():
    n, alpha, confidence = 200, 0.05, 0.9

    def at_least(k):  # P(Binomial(n, alpha) >= k), summed term by term
        return sum(math.comb(n, j) * alpha**j * (1 - alpha)**(n - j) for j in range(k, n + 1))

    expected = max(k for k in range(1, n + 1) if at_least(k) >= confidence)
    assert conformal.order_statistic(n, alpha, confidence) == expected
    assert expected < conformal.order_statistic(n, alpha)  # stricter than the marginal one
    assert conformal.minimum_samples(0.04, 0.95) == 74  # 1 - 0.96^74 >= 0.95 > 1 - 0.96^73
    assert conformal.order_statistic(73, 0.04, 0.95) == 0
    assert conformal.order_statistic(74, 0.04, 0.95) == 1


@pytest.mark.parametrize("n", [300, 2000])
def test_guarantees_hold_over_calibration_draws(n):
    """1000 seeded calibration sets from N(0, 1), whose rejection rate Phi(t) is known."""
    alpha, confidence, draws = 0.05, 0.9, 1000
    rng = np.random.default_rng(n)
    marginal, high = [], []
    for _ in range(draws):
        scores = rng.standard_normal(n)
        marginal.append(stats.norm.cdf(conformal.threshold(scores, alpha)))
        high.append(stats.norm.cdf(conformal.threshold(scores, alpha, confidence)))
    marginal, high = np.array(marginal), np.array(high)
    # the marginal rule: mean rejection rate k / (n + 1) <= alpha, within 3 standard errors
    assert marginal.mean() <= alpha + 3 * marginal.std() / math.sqrt(draws)
    # the high-probability rule: the rate exceeds alpha in at most delta of the draws
    exceeded = (high > alpha).mean()
    delta = 1 - confidence
    assert exceeded <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    # and it is not vacuous: it rejects close to alpha, more than half of it
    assert np.median(high) > alpha / 2
    # the marginal rule alone exceeds alpha far more often than delta
    assert (marginal > alpha).mean() > delta


def test_promise_in_plain_words():
    text = conformal.promise(0.04, 0.95, 5000)
    assert text.startswith("rejects at most 4% of images drawn like the 5000 calibration "
                           "images, with 95% confidence")
    assert "shifted" in text
    with pytest.raises(ValueError, match="alpha"):
        conformal.order_statistic(10, 1.5)
