"""The paper's thresholds: a percentile of the correctly classified calibration images'
scores (section 5, "Choice of thresholds"), per class or shared by all classes."""

from __future__ import annotations

import dataclasses

from sdim_tf import rejection
from sdim_tf.rules.registry import Calibrated, check_grouping, percent, register


@register
@dataclasses.dataclass(frozen=True)
class Percentile:
    """Per class (the paper's): class c's threshold is the `percentile`-th percentile of the
    score of c over the correctly classified images of c; a class with none gets +inf.
    Shared: one percentile over all correctly classified images (suits scores standardised
    across classes). With `budget`, the percentile is instead the largest (steps of 0.05)
    whose thresholds reject at most `budget` of the calibration images, correct or not."""

    name = "percentile"
    refusal = rejection.UNFAMILIAR

    percentile: float = 1
    grouping: str = "per_class"
    budget: float | None = None

    def __post_init__(self):
        check_grouping(self.grouping)
        if not 0 <= self.percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), got {self.percentile}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise ValueError(f"budget must lie in (0, 1), got {self.budget}")

    def calibrate(self, class_scores, labels, class_names=None) -> Calibrated:
        shared = self.grouping == "shared"
        p = rejection.percentile_key(self.percentile if self.budget is None else
                                     rejection.budget_percentile(class_scores, labels,
                                                                 self.budget, shared=shared))
        (result,) = rejection.calibrate(class_scores, labels, [p], shared=shared).values()
        return Calibrated(result["thresholds"], {
            "rule": self.name, "grouping": self.grouping, "percentile": p,
            **({} if self.budget is None else {"budget": self.budget}),
            "counts": result["counts"], "promise": self.promise(p)})

    def promise(self, p) -> str:
        where = " of each class" if self.grouping == "per_class" else ""
        chosen = "" if self.budget is None else (
            f" (the largest rejecting at most {percent(self.budget)} of them)")
        return (f"refuses scores below the {p}th percentile of the correctly classified "
                f"calibration images{where}{chosen}; it promises no rejection rate for new "
                "images")
