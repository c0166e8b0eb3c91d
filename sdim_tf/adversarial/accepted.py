"""What the adaptive attacks aim at: an "undetected" adversarial example, wrong (or the
target) and accepted by the deployed rule (equation 9 and, with an ambiguity threshold,
the gap), which they know; the loss they descend and the compiled pieces they share.

The rule travels as one float vector: the thresholds [C], then min_gap when there is one
(`Acceptance.packed`); a vector of C thresholds alone has no ambiguity threshold.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from sdim_tf import rejection
from sdim_tf.adversarial.results import AttackResult


class Acceptance(NamedTuple):
    """The deployed rule an undetected success must pass: `thresholds` [C] on the predicted
    class's score and, unless None, `min_gap` on the gap (`rejection.decide`)."""

    thresholds: np.ndarray
    min_gap: float | None = None

    def packed(self) -> np.ndarray:
        """float32 [C] or [C + 1]: the thresholds, then min_gap if any."""
        extra = [] if self.min_gap is None else [self.min_gap]
        return np.asarray([*np.asarray(self.thresholds, np.float64), *extra], np.float32)


def packed_rule(rule) -> np.ndarray:
    """An `Acceptance` or thresholds [C] as the vector the compiled pieces take."""
    return rule.packed() if isinstance(rule, Acceptance) else np.asarray(rule, np.float32)


def _unpack(rule, num_classes):
    """(thresholds [C], min_gap: -inf when the vector holds only the thresholds)."""
    rule = tf.cast(rule, tf.float32)
    return rule[:num_classes], tf.concat([rule, [-np.inf]], 0)[num_classes]


def float_scores(scorer, images):
    return tf.cast(scorer(images), tf.float32)  # bfloat16 scores would round the margins


def reached(scores, labels, targets, thresholds):
    """The deployed rule (`thresholds`: [C], or packed with min_gap) accepts the answer and
    it is the target (targets >= 0) or else wrong."""
    scores = tf.cast(scores, tf.float32)
    thresholds, min_gap = _unpack(thresholds, tf.shape(scores)[1])
    decision = rejection.decide(scores, thresholds, min_gap=min_gap)
    predicted = tf.cast(decision.class_ids, tf.int32)
    labels, targets = tf.cast(labels, tf.int32), tf.cast(targets, tf.int32)
    hit = tf.where(targets >= 0, predicted == targets, predicted != labels)
    return hit & tf.logical_not(decision.rejected)


def undetected_success(scores, labels, thresholds) -> np.ndarray:
    """Misclassified and accepted by the deployed rule (`rejection.decide`; `thresholds`: an
    `Acceptance` or thresholds [C]), bool [N]."""
    labels = np.asarray(labels)
    return reached(scores, labels, np.full(len(labels), -1), packed_rule(thresholds)).numpy()


def margin_loss(scores, labels, targets, thresholds, margin=0.0):
    """Per image relu(t_k - s_k + margin) + relu(max_{j != k} s_j + g - s_k + margin) with
    g = max(min_gap, 0): zero once class k clears its threshold and leads every other class
    by the ambiguity threshold and `margin`. k is the target, or where targets < 0 the wrong
    class closest to an undetected success. `thresholds`: [C], or packed with min_gap.
    `margin` inf drops the hinges: the loss, (t_k - s_k) + (max_{j != k} s_j + g - s_k),
    keeps falling as class k clears them by more (a transfer attack's aim on its source)."""
    scores = tf.cast(scores, tf.float32)
    thresholds, min_gap = _unpack(thresholds, tf.shape(scores)[1])
    top = tf.math.top_k(scores, 2).values
    rivals = tf.where(scores == top[:, :1], top[:, 1:], top[:, :1])  # best other class
    over_threshold = scores - thresholds
    ahead = scores - rivals - tf.maximum(min_gap, 0.0)
    closeness = tf.where(tf.one_hot(labels, tf.shape(scores)[1]) > 0, -np.inf,
                         tf.minimum(over_threshold, ahead))
    k = tf.where(targets >= 0, targets, tf.argmax(closeness, 1, output_type=tf.int32))
    short = tf.gather(-tf.stack([over_threshold, ahead], 2), k, axis=1, batch_dims=1)
    margin = tf.cast(margin, tf.float32)
    return tf.reduce_sum(tf.where(tf.math.is_inf(margin), short, tf.nn.relu(short + margin)), 1)


def specs(image_shape):
    return (tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32))


def evaluator(scorer, image_shape):
    """Compiled: images, labels, targets, thresholds -> (scores, margin loss, success)."""
    images, ints, floats, _ = specs(image_shape)

    @tf.function(input_signature=[images, ints, ints, floats], reduce_retracing=True)
    def evaluate(x, labels, targets, thresholds):
        scores = float_scores(scorer, x)
        return (scores, margin_loss(scores, labels, targets, thresholds),
                reached(scores, labels, targets, thresholds))

    def batched(x, labels, targets, thresholds, batch_size):
        parts = [evaluate(x[i:i + batch_size], labels[i:i + batch_size],
                          targets[i:i + batch_size], thresholds)
                 for i in range(0, max(len(x), 1), batch_size)]  # one empty batch for none
        return tuple(np.concatenate([p[j].numpy() for p in parts]) for j in range(3))

    return batched


def attack_inputs(images, labels, targets, thresholds):
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    targets = np.full(len(images), -1, np.int32) if targets is None \
        else np.asarray(targets, np.int32)
    return images, labels, targets, tf.constant(packed_rule(thresholds), tf.float32)


def accepted_result(name, evaluate, adversarial, labels, targets, thresholds, batch_size,
                    started) -> AttackResult:
    """Scores from a separate forward pass on the returned images; success re-checked on them
    by the deployed rule."""
    scores, _, _ = evaluate(adversarial, labels, targets, thresholds, batch_size)
    success = reached(scores, labels, targets, thresholds).numpy()
    return AttackResult(name, adversarial, scores, success, time.time() - started,
                        None if (targets < 0).all() else targets)
