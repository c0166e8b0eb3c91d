"""What the adaptive attacks aim at: an "undetected" adversarial example, wrong (or the
target) and accepted by the rejection rule (equation 9), which they know; the loss they
descend and the compiled pieces they share.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from sdim_tf import rejection
from sdim_tf.adversarial.results import AttackResult


def float_scores(scorer, images):
    return tf.cast(scorer(images), tf.float32)  # bfloat16 scores would round the margins


def reached(scores, labels, targets, thresholds):
    """Equation 9 accepts the answer and it is the target (targets >= 0) or else wrong."""
    decision = rejection.decide(scores, thresholds)
    predicted = tf.cast(decision.class_ids, tf.int32)
    labels, targets = tf.cast(labels, tf.int32), tf.cast(targets, tf.int32)
    hit = tf.where(targets >= 0, predicted == targets, predicted != labels)
    return hit & tf.logical_not(decision.rejected)


def undetected_success(scores, labels, thresholds) -> np.ndarray:
    """Misclassified and accepted by the deployed rule (`rejection.decide`), bool [N]."""
    labels = np.asarray(labels)
    return reached(scores, labels, np.full(len(labels), -1), thresholds).numpy()


def margin_loss(scores, labels, targets, thresholds, margin=0.0):
    """Per image relu(t_k - s_k + margin) + relu(max_{j != k} s_j - s_k + margin): zero once
    class k clears its threshold and leads every other class by `margin`. k is the target, or
    where targets < 0 the wrong class closest to an undetected success."""
    scores = tf.cast(scores, tf.float32)
    top = tf.math.top_k(scores, 2).values
    rivals = tf.where(scores == top[:, :1], top[:, 1:], top[:, :1])  # best other class
    over_threshold, ahead = scores - tf.cast(thresholds, tf.float32), scores - rivals
    closeness = tf.where(tf.one_hot(labels, tf.shape(scores)[1]) > 0, -np.inf,
                         tf.minimum(over_threshold, ahead))
    k = tf.where(targets >= 0, targets, tf.argmax(closeness, 1, output_type=tf.int32))
    short = -tf.stack([over_threshold, ahead], 2) + margin  # [N, C, 2]
    return tf.reduce_sum(tf.nn.relu(tf.gather(short, k, axis=1, batch_dims=1)), 1)


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
    return images, labels, targets, tf.constant(np.asarray(thresholds), tf.float32)


def accepted_result(name, evaluate, adversarial, labels, targets, thresholds, batch_size,
                    started) -> AttackResult:
    """Scores from a separate forward pass on the returned images; success re-checked on them
    by the deployed rule."""
    scores, _, _ = evaluate(adversarial, labels, targets, thresholds, batch_size)
    success = reached(scores, labels, targets, thresholds).numpy()
    return AttackResult(name, adversarial, scores, success, time.time() - started,
                        None if (targets < 0).all() else targets)
