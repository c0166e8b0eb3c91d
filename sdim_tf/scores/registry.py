"""What a rejection score is, and the registry that finds one by name.

A score is fitted on a trained classifier (and, if it needs them, training images) into a
scorer: a Keras model mapping images to class scores [N, C] whose argmax is the predicted
class and whose maximum the rule thresholds, with `scores_and_logits(images)` (the class
scores and the classifier's own logits from one pass) for `serving.RejectingClassifier`.
A new score is one module of `sdim_tf/scores/` (the package imports every module) with a
class decorated by `@register`; `pipeline.config.SCORE_FLAGS` says which calibrate flag sets
a setting not named after its flag. Optional: `paper = True` marks the paper's own score,
on whose scale the paper's settings apply (e.g. its CW confidences).
"""

from __future__ import annotations

import os
from typing import ClassVar, Protocol

import keras

from sdim_tf.registry import Registry


class Score(Protocol):
    name: ClassVar[str]  # registry key
    # The thresholds that suit it by default: "per_class" or "shared" (rules.GROUPINGS).
    default_grouping: ClassVar[str]
    report_note: ClassVar[str]  # one sentence for evaluation reports

    @property
    def description(self) -> str:
        """What the deployed score is, in the model card's words."""

    def settings(self) -> dict:
        """JSON-able constructor arguments: `get(name)(**settings)` rebuilds it."""

    def fit(self, model: keras.Model, batches=None, progress=None) -> keras.Model:
        """The scorer of trained `model`, fitted on (images, labels) `batches` if needed."""

    def save(self, scorer: keras.Model, folder: str | os.PathLike) -> list[str]:
        """Writes what `load` needs into `folder`; returns the file names."""

    def load(self, model: keras.Model, folder: str | os.PathLike) -> keras.Model:
        """The scorer `save` wrote, on top of `model`; ValueError naming a bad file."""


SCORES = Registry("score")
register, get = SCORES.register, SCORES.get
