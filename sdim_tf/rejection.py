"""Per-class thresholds from training-set percentiles and the decision with rejection.

Paper section 3.2 (equation 9) and section 5, "Choice of thresholds": for each class c, the
p-th percentile of log p(x|y=c) over the correctly classified training samples of class c.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf


def percentile_value(scores: np.ndarray, p: float) -> float:
    """The authors' rule: the value at index floor(p/100 * n) of the n sorted scores."""
    ordered = np.sort(np.asarray(scores, np.float64))
    return float(ordered[min(int(math.floor(p / 100.0 * len(ordered))), len(ordered) - 1)])


def calibrate(log_likelihoods: np.ndarray, labels: np.ndarray,
              percentiles: Sequence[float] = (1, 2), shared: bool = False) -> dict:
    """Thresholds per percentile and class: {p: {"thresholds": [C], "counts": [C]}}.

    A class with no correctly classified sample gets +inf: every prediction of it is rejected.
    `shared`: every class gets the percentile of all correctly classified samples' scores
    (one threshold; better than per class for scores standardised across classes).
    """
    ll = np.asarray(log_likelihoods, np.float64)
    labels = np.asarray(labels)
    if ll.ndim != 2 or len(ll) != len(labels):
        raise ValueError(f"log_likelihoods must be [N, C] with N = len(labels); got {ll.shape} "
                         f"and {labels.shape}")
    predicted = ll.argmax(axis=1)
    result = {}
    for p in percentiles:
        if not 0 <= p < 100:
            raise ValueError(f"percentile must be in [0, 100), got {p}")
        thresholds, counts = [], []
        for c in range(ll.shape[1]):
            scores = ll[(labels == c) & (predicted == c), c]
            counts.append(int(len(scores)))
            thresholds.append(percentile_value(scores, p) if len(scores) else math.inf)
        if shared:
            correct = ll[np.arange(len(ll)), labels][predicted == labels] \
                if len(ll) else np.zeros(0)
            value = percentile_value(correct, p) if len(correct) else math.inf
            thresholds = [value] * ll.shape[1]
        result[p] = {"thresholds": np.asarray(thresholds), "counts": counts}
    return result


def budget_percentile(log_likelihoods: np.ndarray, labels: np.ndarray, budget: float,
                      step: float = 0.05, limit: float = 50.0, shared: bool = False) -> float:
    """The largest percentile (a multiple of `step` below `limit`) whose thresholds (see
    `calibrate`) reject at most `budget` (a fraction) of these samples, correct or not.

    The rejected share only grows with the percentile, so the first one over budget ends the
    search; 0 when even the 0th percentile rejects more (its misclassified samples).
    """
    if not 0 < budget < 1:
        raise ValueError(f"budget must be a fraction in (0, 1), got {budget}")
    ll = np.asarray(log_likelihoods, np.float64)
    predicted, top = ll.argmax(1), ll.max(1)
    best = 0.0
    for p in np.arange(0.0, limit, step):
        p = round(float(p), 4)
        thresholds = calibrate(ll, labels, (p,), shared)[p]["thresholds"]
        if not (top < thresholds[predicted]).mean() <= budget:
            break
        best = p
    return best


def decide(log_likelihoods, thresholds) -> tuple[tf.Tensor, tf.Tensor]:
    """Equation 9: (predicted class int64 [N], rejected bool [N]).

    Rejected when the largest log-likelihood is below its class's threshold (or not finite).
    """
    ll = tf.convert_to_tensor(log_likelihoods, tf.float32)
    thresholds = tf.convert_to_tensor(thresholds, tf.float32)
    predicted = tf.argmax(ll, axis=1)
    score = tf.reduce_max(ll, axis=1)
    rejected = tf.logical_not(score >= tf.gather(thresholds, predicted))  # NaN -> rejected
    return predicted, rejected


def to_json(calibration: dict) -> dict:
    """JSON form: +inf thresholds become null (with their count 0)."""
    return {str(p): {"thresholds": [None if not math.isfinite(t) else float(t)
                                    for t in v["thresholds"]], "counts": list(v["counts"])}
            for p, v in calibration.items()}


def from_json(obj: dict) -> dict:
    return {float(p) if "." in p else int(p): {
        "thresholds": np.asarray([math.inf if t is None else t for t in v["thresholds"]]),
        "counts": v["counts"]} for p, v in obj.items()}
