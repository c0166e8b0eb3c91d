"""Per-class thresholds from training-set percentiles and the decision with rejection.

Paper section 3.2 (equation 9) and section 5, "Choice of thresholds": for each class c, the
p-th percentile of log p(x|y=c) over the correctly classified training samples of class c.
`decide` also applies the second refusal of `rules.ambiguous` when given its threshold.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf


def percentile_key(p: float) -> int | float:
    """A percentile as the number its JSON key and flags use: 1.0 -> 1, 3.55 -> 3.55."""
    p = float(p)
    return int(p) if p.is_integer() else p


def _key(p: str) -> int | float | str:
    try:
        return percentile_key(p)
    except ValueError:
        return p


def percentile_value(scores: np.ndarray, p: float) -> float:
    """The authors' rule: the value at index floor(p/100 * n) of the n sorted scores."""
    return _at_percentile(np.sort(np.asarray(scores, np.float64)), p)


def _at_percentile(ordered: np.ndarray, p: float) -> float:
    return float(ordered[min(int(math.floor(p / 100.0 * len(ordered))), len(ordered) - 1)])


def _sorted_correct(class_scores: np.ndarray, labels: np.ndarray,
                    shared: bool) -> list[np.ndarray]:
    """Per class (or, `shared`, once for all classes) the sorted scores of the correctly
    classified samples of that class under their own class."""
    predicted = class_scores.argmax(axis=1)
    if shared:
        correct = class_scores[np.arange(len(class_scores)), labels][predicted == labels] \
            if len(class_scores) else np.zeros(0)
        return [np.sort(correct)]
    return [np.sort(class_scores[(labels == c) & (predicted == c), c])
            for c in range(class_scores.shape[1])]


def _thresholds(ordered: list[np.ndarray], p: float, num_classes: int) -> np.ndarray:
    values = [_at_percentile(o, p) if len(o) else math.inf for o in ordered]
    return np.asarray(values * num_classes if len(ordered) == 1 < num_classes else values)


def check_scores(class_scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(class_scores [N, C] as float64, labels [N]), or ValueError naming the shapes."""
    scores = np.asarray(class_scores, np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"class_scores must be [N, C] with N = len(labels); got "
                         f"{scores.shape} and {labels.shape}")
    return scores, labels


def calibrate(class_scores: np.ndarray, labels: np.ndarray,
              percentiles: Sequence[float] = (1, 2), shared: bool = False) -> dict:
    """Thresholds per percentile and class: {p: {"thresholds": [C], "counts": [C]}}.

    A class with no correctly classified sample gets +inf under the per-class rule: every
    prediction of it is rejected. `shared`: every class gets the percentile of all correctly
    classified samples' scores (one threshold; better than per class for scores
    standardised across classes). `counts` are per class under both rules.
    """
    scores, labels = check_scores(class_scores, labels)
    per_class = _sorted_correct(scores, labels, shared=False)
    ordered = _sorted_correct(scores, labels, shared=True) if shared else per_class
    result = {}
    for p in percentiles:
        if not 0 <= p < 100:
            raise ValueError(f"percentile must be in [0, 100), got {p}")
        result[p] = {"thresholds": _thresholds(ordered, p, scores.shape[1]),
                     "counts": [int(len(o)) for o in per_class]}
    return result


def budget_percentile(class_scores: np.ndarray, labels: np.ndarray, budget: float,
                      step: float = 0.05, limit: float = 50.0, shared: bool = False) -> float:
    """The largest percentile (a multiple of `step` below `limit`) whose thresholds (see
    `calibrate`) reject at most `budget` (a fraction) of these samples, correct or not.

    The rejected share only grows with the percentile, so the first one over budget ends the
    search; 0 when even the 0th percentile rejects more (its misclassified samples).
    """
    if not 0 < budget < 1:
        raise ValueError(f"budget must be a fraction in (0, 1), got {budget}")
    scores, labels = check_scores(class_scores, labels)
    predicted, top = scores.argmax(1), scores.max(1)
    ordered = _sorted_correct(scores, labels, shared)  # sorted once for every step
    best = 0.0
    for p in np.arange(0.0, limit, step):
        p = round(float(p), 4)
        thresholds = _thresholds(ordered, p, scores.shape[1])
        if not (top < thresholds[predicted]).mean() <= budget:
            break
        best = p
    return best


# The reasons a valid input is refused, in order of precedence.
UNFAMILIAR = "unfamiliar"  # its score is below its class's threshold (equation 9)
AMBIGUOUS = "ambiguous"  # its gap is below the selective-risk threshold


class Decision(NamedTuple):
    """Equation 9, per sample, and the second refusal: the predicted class, its score and
    threshold, its gap and the gap's threshold, why a valid input is refused, and whether
    the answer is refused."""

    class_ids: tf.Tensor  # int64 [N]
    score: tf.Tensor  # [N], the dtype of the scores
    threshold: tf.Tensor  # [N]
    rejected: tf.Tensor  # bool [N]: unfamiliar, ambiguous or invalid
    gap: tf.Tensor  # [N], see `gap`; -inf for invalid inputs
    min_gap: tf.Tensor  # [N]; -inf without an ambiguity threshold
    unfamiliar: tf.Tensor  # bool [N]: valid, and not score >= threshold
    ambiguous: tf.Tensor  # bool [N]: valid, not unfamiliar, and not gap >= min_gap

    def reasons(self) -> tf.Tensor:
        """string [N]: UNFAMILIAR, AMBIGUOUS or "" (accepted, or refused as invalid)."""
        return tf.where(self.unfamiliar, UNFAMILIAR, tf.where(self.ambiguous, AMBIGUOUS, ""))


def gap(class_scores) -> tf.Tensor:
    """[N, C] -> [N]: the best class score minus the second best, i.e. the log of the ratio
    of the two largest posterior probabilities softmax(class_scores). Unlike their
    difference it does not saturate at 1 where the classes lie far apart. +inf with one
    class."""
    class_scores = tf.convert_to_tensor(class_scores)
    if class_scores.shape[-1] == 1:
        return tf.fill(tf.shape(class_scores)[:1], tf.constant(np.inf, class_scores.dtype))
    best = tf.math.top_k(class_scores, k=2).values
    return best[:, 0] - best[:, 1]


def decide(class_scores, thresholds, valid=None, min_gap=None) -> Decision:
    """Equation 9: unfamiliar = not (score >= threshold of the predicted class); with
    `min_gap` (a scalar, see `rules.ambiguous`), an input that passes is ambiguous when
    not gap >= min_gap: the confidence of selective classification. Rejected: unfamiliar,
    ambiguous or invalid.

    `class_scores` [N, C] (the paper's log p(x|c), or any class scores), compared at their
    own precision (float64 scores against float64 thresholds, as the rules choose them;
    float32 in serving); `valid` bool [N] marks inputs that passed validation (None: all).
    NaN scores are rejected. Without `min_gap` no input is ambiguous.
    """
    scores = tf.convert_to_tensor(class_scores)
    if scores.dtype not in (tf.float32, tf.float64):
        scores = tf.cast(scores, tf.float32)
    thresholds = _cast_thresholds(thresholds, scores.dtype)
    class_ids = tf.argmax(scores, axis=1)
    score = tf.reduce_max(scores, axis=1)
    threshold = tf.gather(thresholds, class_ids)
    unfamiliar = tf.logical_not(score >= threshold)
    gaps = gap(scores)
    if min_gap is None:
        least = tf.fill(tf.shape(score), tf.constant(-np.inf, scores.dtype))
        ambiguous = tf.zeros_like(unfamiliar)
    else:
        least = tf.broadcast_to(_cast_thresholds(min_gap, scores.dtype), tf.shape(score))
        ambiguous = tf.logical_not(unfamiliar) & tf.logical_not(gaps >= least)
    rejected = unfamiliar | ambiguous
    if valid is not None:
        rejected = rejected | tf.logical_not(valid)
        unfamiliar, ambiguous = unfamiliar & valid, ambiguous & valid
        gaps = tf.where(valid, gaps, tf.constant(-np.inf, scores.dtype))
    return Decision(class_ids, score, threshold, rejected, gaps, least, unfamiliar, ambiguous)


def outcomes(decision: Decision, labels=None) -> dict:
    """What a decision did to a set of images, as shares of all of them: accepted
    (`coverage`), refused as unfamiliar, refused as ambiguous; with `labels`, the accuracy,
    the accuracy among the accepted (None when none is) and the silent error (accepted and
    wrong). Without labels (images of no known class) every accepted answer is wrong: the
    silent error is the coverage."""
    rejected = decision.rejected.numpy()
    n, accepted = len(rejected), ~rejected
    result = {"images": int(n), "coverage": _mean(accepted), "rejected": _mean(rejected),
              UNFAMILIAR: _mean(decision.unfamiliar.numpy()),
              AMBIGUOUS: _mean(decision.ambiguous.numpy())}
    if labels is None:
        return {**result, "silent_error": result["coverage"]}
    right = decision.class_ids.numpy() == np.asarray(labels).reshape(-1)
    return {**result, "accuracy": _mean(right),
            "accuracy_on_accepted": _mean(right[accepted]) if accepted.any() else None,
            "silent_error": _mean(accepted & ~right)}


def _mean(flags: np.ndarray) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan


def _cast_thresholds(thresholds, dtype) -> tf.Tensor:
    if not (tf.is_tensor(thresholds) or isinstance(thresholds, tf.Variable)):
        thresholds = np.asarray(thresholds, np.float64)  # not through float32
    return tf.cast(thresholds, dtype)


# scorer -> its forward pass, traced once per scorer and batch shape rather than once per call
# (the evaluate stage scores ~60 image sets with one scorer); the function holds the scorer
# weakly, so an entry goes with its scorer.
_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _forward(scorer):
    forward = _FORWARD.get(scorer)
    if forward is None:
        held = weakref.ref(scorer)
        forward = _FORWARD[scorer] = tf.function(
            lambda images: held()(images, training=False))
    return forward


def class_scores(scorer, batches) -> tuple[np.ndarray, np.ndarray]:
    """(scorer's [N, C] class scores as float64, labels [N]) over (images, labels) batches."""
    forward = _forward(scorer)
    outputs, labels = [], []
    for images, batch_labels in batches:
        outputs.append(forward(images).numpy())
        labels.append(np.asarray(batch_labels))
    return np.concatenate(outputs).astype(np.float64), np.concatenate(labels)


def to_json(calibration: dict) -> dict:
    """JSON form: +inf thresholds become null (with their count 0)."""
    return {str(p): {"thresholds": [None if not math.isfinite(t) else float(t)
                                    for t in v["thresholds"]], "counts": list(v["counts"])}
            for p, v in calibration.items()}


def from_json(obj: dict) -> dict:
    """Numeric keys become numbers (percentiles); others (e.g. "conformal") stay strings."""
    return {_key(p): {
        "thresholds": np.asarray([math.inf if t is None else t for t in v["thresholds"]]),
        "counts": v["counts"]} for p, v in obj.items()}
