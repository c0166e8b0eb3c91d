"""Thresholds with a finite-sample guarantee on false rejections (split conformal).

With n held-out scores s_(1) <= ... <= s_(n), drawn like the inputs to come (exchangeable),
and the rule "reject when score < s_(k)":

- marginal: P(a new input is rejected) <= k / (n + 1); k = floor(alpha (n + 1)) keeps it at
  most alpha (Vovk et al. 2005; Angelopoulos & Bates 2021).
- with confidence 1 - delta over the calibration draw: the rejection rate F(s_(k)) is a
  Beta(k, n - k + 1) variable, so P(rate <= alpha) = P(Binomial(n, alpha) >= k); the largest
  k with that probability >= 1 - delta keeps the rate at most alpha with probability
  1 - delta (Vovk 2012, "training-conditional" validity).

k = 0 means no threshold (-inf): too few held-out scores to promise anything this strict.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def order_statistic(n: int, alpha: float, confidence: float | None = None) -> int:
    """k (1-based, 0 = none) of the threshold s_(k) for n scores, budget alpha and, if given,
    the confidence 1 - delta of the high-probability version."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if confidence is None:
        return min(int(math.floor(alpha * (n + 1) + 1e-9)), n)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    ks = np.arange(1, n + 1)
    # P(Binomial(n, alpha) >= k) falls with k: the last k where it still reaches 1 - delta.
    ok = stats.binom.sf(ks - 1, n, alpha) >= confidence
    return int(ks[ok].max()) if ok.any() else 0


def threshold(scores, alpha: float, confidence: float | None = None) -> float:
    """The threshold s_(k) (see `order_statistic`) of held-out `scores`; -inf when k = 0."""
    ordered = np.sort(np.asarray(scores, np.float64))
    k = order_statistic(len(ordered), alpha, confidence)
    return float(ordered[k - 1]) if k else -math.inf


def minimum_samples(alpha: float, confidence: float | None = None) -> int:
    """The fewest held-out scores for which the rule gives a threshold at all (k >= 1)."""
    if confidence is None:
        return int(math.ceil(1 / alpha - 1 - 1e-9))
    # k = 1 needs P(Binomial(n, alpha) >= 1) = 1 - (1 - alpha)^n >= confidence.
    return int(math.ceil(math.log(1 - confidence) / math.log(1 - alpha) - 1e-9))


def attainable(alpha: float, confidence: float | None, n: int
               ) -> tuple[float, float | None]:
    """The strongest promise `n` held-out scores support for budget `alpha`, as (alpha,
    confidence): as asked from `minimum_samples(alpha, confidence)` scores; else on average
    (confidence None) from `minimum_samples(alpha)`; else on average at the smallest budget
    n scores promise, 1 / (n + 1) (the lowest score is the threshold)."""
    if n >= minimum_samples(alpha, confidence):
        return alpha, confidence
    if n >= minimum_samples(alpha):
        return alpha, None
    return 1.0 / (n + 1), None


def promise(alpha: float, confidence: float | None, n: int) -> str:
    """The guarantee in plain words, for the model card."""
    how = f"with {100 * confidence:g}% confidence" if confidence else "on average"
    return (f"rejects at most {100 * alpha:g}% of images drawn like the {n} calibration "
            f"images, {how} (split conformal); it promises nothing for a shifted population")
