"""Thresholds that reject at most a budget alpha of images drawn like the held-out ones: the
deployed rule, chosen in one place for the calibrate stage and the training monitor.

- "conformal": split conformal (`sdim_tf.conformal`) on the held-out images' top scores,
  correct or not; at most alpha rejected on average, or with probability `confidence` over
  the held-out draw. One threshold for all classes, or one per predicted class (Mondrian).
- "percentile": the largest percentile (steps of 0.05) of the correct held-out images'
  scores whose thresholds reject at most alpha of the held-out images (no promise for new
  images).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sdim_tf import conformal, rejection

RULES = ("conformal", "percentile")


class BudgetThresholds(NamedTuple):
    thresholds: np.ndarray  # float64 [C]
    # per class, the held-out scores its threshold comes from: all top scores (shared), or
    # those of the images predicted as the class (conformal per class); for "percentile"
    # the correctly classified images of the class
    counts: list[int]
    percentile: float | None = None  # rule "percentile" only


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")


def budget_thresholds(log_likelihoods: np.ndarray, alpha: float, *, rule: str = "conformal",
                      labels: np.ndarray | None = None, confidence: float | None = None,
                      per_class: bool = False) -> BudgetThresholds:
    """The thresholds of `rule` (see the module docstring) on held-out class scores [N, C];
    `labels` are needed by "percentile" only."""
    check_rule(rule)
    num_classes = log_likelihoods.shape[1]
    if rule == "percentile":
        if labels is None:
            raise ValueError("the percentile rule needs the held-out labels")
        labels = np.asarray(labels).reshape(-1)
        percentile = rejection.budget_percentile(log_likelihoods, labels, alpha,
                                                 shared=not per_class)
        chosen = rejection.calibrate(log_likelihoods, labels, (percentile,),
                                     shared=not per_class)[percentile]
        return BudgetThresholds(np.asarray(chosen["thresholds"]), chosen["counts"], percentile)
    top = log_likelihoods.max(1)
    if per_class:
        predicted = log_likelihoods.argmax(1)
        groups = [top[predicted == c] for c in range(num_classes)]
    else:
        groups = [top]
    thresholds = [conformal.threshold(g, alpha, confidence) for g in groups]
    if len(thresholds) == 1:
        thresholds = thresholds * num_classes
    counts = [int(len(g)) for g in groups] * (num_classes // len(groups))
    return BudgetThresholds(np.asarray(thresholds), counts)
