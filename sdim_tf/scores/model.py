"""The paper's score: the classifier's own output (SDIM: log p(x|c); logits for the
discriminative baseline)."""

from __future__ import annotations

import dataclasses

from sdim_tf.scores.registry import register


@register
@dataclasses.dataclass(frozen=True)
class ModelScore:
    """The classifier is its own scorer: nothing to fit or save."""

    name = "model"
    paper = True  # the paper's figures and settings on its scale apply
    default_grouping = "per_class"  # the paper's
    report_note = "the model's own log p(x|c) of the predicted class (the paper's)."

    @property
    def description(self) -> str:
        return "the predicted class's output of the model (SDIM: log p(x|c))"

    def settings(self) -> dict:
        return {}

    def fit(self, model, batches=None, progress=None):
        return model

    def save(self, scorer, folder) -> list[str]:
        return []

    def load(self, model, folder):
        return model
