"""Thresholds with a finite-sample guarantee on false rejections: split conformal on the
held-out images' top scores (`sdim_tf.conformal`), shared or per predicted class."""

from __future__ import annotations

import dataclasses

import numpy as np

from sdim_tf import conformal, rejection
from sdim_tf.rules.registry import (
    Calibrated,
    CalibrationError,
    check_grouping,
    percent,
    register,
)


@register
@dataclasses.dataclass(frozen=True)
class SplitConformal:
    """Refuses at most `alpha` of new images drawn like the held-out ones, on average or,
    with `confidence`, with that probability over the held-out draw. Shared: one
    threshold over all images; per class (Mondrian): one per predicted class, each with the
    guarantee among the images predicted as that class. Labels are not used: every
    held-out image counts, correct or not."""

    name = "conformal"
    refusal = rejection.UNFAMILIAR

    alpha: float = 0.04
    confidence: float | None = 0.95
    grouping: str = "shared"

    def __post_init__(self):
        check_grouping(self.grouping)
        conformal.order_statistic(1, self.alpha, self.confidence)  # checks both

    def calibrate(self, class_scores, labels, class_names=None) -> Calibrated:
        scores, _ = rejection.check_scores(class_scores, labels)
        num_classes = scores.shape[1]
        names = class_names or [str(c) for c in range(num_classes)]
        top, predicted = scores.max(1), scores.argmax(1)
        needed = conformal.minimum_samples(self.alpha, self.confidence)
        alpha, confidence = self.alpha, self.confidence
        if self.grouping == "shared":
            groups = [top]
            # too few held-out images: the strongest promise they support, recorded as such
            alpha, confidence = conformal.attainable(alpha, confidence, len(top))
        else:
            groups = [top[predicted == c] for c in range(num_classes)]
            few = [f"{names[c]} ({len(g)})" for c, g in enumerate(groups) if len(g) < needed]
            if few:
                raise CalibrationError(
                    f"too few held-out images predicted as {few} for a per-class "
                    f"{percent(self.alpha)} guarantee (each class needs {needed}); share the "
                    "threshold or hold out more images")
        thresholds = [conformal.threshold(g, alpha, confidence) for g in groups]
        repeat = num_classes // len(groups)
        return Calibrated(np.asarray(thresholds * repeat), {
            "rule": self.name, "grouping": self.grouping, "alpha": alpha,
            "confidence": confidence, "n": int(len(top)),
            "asked": {"alpha": self.alpha, "confidence": self.confidence},
            "counts": [int(len(g)) for g in groups] * repeat,
            "promise": self._words(alpha, confidence, len(top))})

    def promise(self, n: int) -> str:
        return self._words(self.alpha, self.confidence, n)

    def _words(self, alpha: float, confidence: float | None, n: int) -> str:
        text = conformal.promise(alpha, confidence, n)
        return text + "; for each predicted class" if self.grouping == "per_class" else text
