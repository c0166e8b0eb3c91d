"""Threshold rules, found by name: `rules.get("conformal")(alpha=0.04)`.

- `percentile` (the paper's): a percentile of the correctly classified calibration images'
  scores, per class or shared (or the largest rejecting at most a budget of them); no
  promise for new images.
- `conformal`: split conformal, shared or per predicted class; refuses at most alpha of
  new images like the held-out ones.
- `ambiguous`: the second refusal, a threshold on the gap between the two best class
  scores; at most max_error wrong answers among the accepted ones.

`calibrate_both` calibrates an unfamiliar rule and, optionally, `ambiguous` on held-out
class scores; `rejection.decide` applies what they return.
"""

import importlib
import pkgutil

from sdim_tf.rules import ambiguous, percentile, split_conformal
from sdim_tf.rules.ambiguous import Ambiguous, calibrate_both
from sdim_tf.rules.percentile import Percentile
from sdim_tf.rules.registry import (
    GROUPINGS,
    RULES,
    Calibrated,
    CalibrationError,
    Rule,
    build,
    get,
    names,
    register,
)
from sdim_tf.rules.split_conformal import SplitConformal

__all__ = ["GROUPINGS", "RULES", "Ambiguous", "Calibrated", "CalibrationError", "Percentile",
           "Rule", "SplitConformal", "ambiguous", "build", "calibrate_both", "get", "names",
           "percentile", "register", "split_conformal"]

# every module of the package registers what it defines: a new one needs no line here
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
