"""The paper's thresholds: a percentile of the correctly classified calibration images'
scores (section 5, "Choice of thresholds"), per class or shared by all classes."""

from __future__ import annotations

import dataclasses

from sdim_tf import rejection
from sdim_tf.rules.registry import Calibrated, check_grouping, register


@register
@dataclasses.dataclass(frozen=True)
class Percentile:
    """Per class (the paper's): class c's threshold is the `percentile`-th percentile of the
    score of c over the correctly classified images of c; a class with none gets +inf.
    Shared: one percentile over all correctly classified images (suits scores standardised
    across classes)."""

    name = "percentile"
    refusal = rejection.UNFAMILIAR

    percentile: float = 1
    grouping: str = "per_class"

    def __post_init__(self):
        check_grouping(self.grouping)
        if not 0 <= self.percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), got {self.percentile}")

    def calibrate(self, class_scores, labels, class_names=None) -> Calibrated:
        p = rejection.percentile_key(self.percentile)
        (result,) = rejection.calibrate(class_scores, labels, [p],
                                        shared=self.grouping == "shared").values()
        return Calibrated(result["thresholds"], {
            "rule": self.name, "grouping": self.grouping, "percentile": p,
            "counts": result["counts"], "promise": self.promise()})

    def promise(self) -> str:
        where = " of each class" if self.grouping == "per_class" else ""
        return (f"refuses scores below the {rejection.percentile_key(self.percentile)}th "
                f"percentile of the correctly classified calibration images{where}; it "
                "promises no rejection rate for new images")
