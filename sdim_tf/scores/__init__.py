"""Rejection scores, found by name: `scores.get("feature_density")(layers=("head",))`.

- `model` (the paper's): the classifier's own output, log p(x|c) for SDIM;
- `feature_density`: tied Gaussians fitted after training on encoder layers.
"""

import importlib
import pkgutil

from sdim_tf.scores import feature_density, model
from sdim_tf.scores.feature_density import FeatureDensityScore
from sdim_tf.scores.model import ModelScore
from sdim_tf.scores.registry import SCORES, Score, get, register

__all__ = ["SCORES", "FeatureDensityScore", "ModelScore", "Score", "feature_density", "get",
           "model", "register"]

# every module of the package registers what it defines: a new one needs no line here
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
