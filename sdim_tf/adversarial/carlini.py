"""Targeted CW-L2 towards an undetected success of the target."""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from sdim_tf.adversarial.accepted import (
    accepted_result,
    attack_inputs,
    evaluator,
    float_scores,
    margin_loss,
    reached,
    specs,
)
from sdim_tf.adversarial.results import AttackResult


def _carlini_program(scorer, image_shape):
    images, ints, floats, scalar = specs(image_shape)

    # compiled step, loop in Python (see pgd.pgd_program)
    @tf.function(input_signature=[images, images, images, images, ints, floats, floats, scalar,
                                  scalar, scalar], reduce_retracing=True)
    def step(clean, w, m, v, targets, thresholds, const, t, learning_rate, confidence):
        """At w: (x, its squared L2 distance, whether it is an undetected success of the
        target); then one Adam step: (w, m, v)."""
        with tf.GradientTape() as tape:
            tape.watch(w)
            x = (tf.tanh(w) + 1) / 2
            scores = float_scores(scorer, x)
            l2 = tf.reduce_sum(tf.square(x - clean), [1, 2, 3])
            # the targets stand in for the labels, which a targeted loss does not use
            loss = l2 + const * margin_loss(scores, targets, targets, thresholds, confidence)
        g = tape.gradient(loss, w)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * tf.square(g)
        w -= learning_rate * m / (1 - 0.9 ** t) / (tf.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        return x, l2, reached(scores, targets, targets, thresholds), w, m, v

    def attack(clean, targets, thresholds, const, steps, learning_rate, confidence):
        """Adam on ||x - clean||^2 + const * margin loss in tanh space; the closest
        undetected success of the target (squared L2 inf where none)."""
        w = np.arctanh((2 * clean - 1) * 0.999999).astype(np.float32)
        m, v = np.zeros_like(w), np.zeros_like(w)
        best, best_l2 = clean.copy(), np.full(len(targets), np.inf, np.float32)
        for t in range(1, steps + 1):
            x, l2, hit, w, m, v = step(clean, w, m, v, targets, thresholds, const, t,
                                       learning_rate, confidence)
            x, l2, hit = x.numpy(), l2.numpy(), hit.numpy()
            better = hit & (l2 < best_l2)
            best[better], best_l2[better] = x[better], l2[better]
        return best, best_l2

    return attack


def carlini_accepted(scorer, images, targets, thresholds, *, confidence: float = 0.0,
                     steps: int = 100, search_steps: int = 5, initial_const: float = 1.0,
                     learning_rate: float = 0.01, batch_size: int = 100) -> AttackResult:
    """Targeted CW-L2 on `margin_loss` with margin `confidence`: per image the smallest-L2
    undetected success of its target over a binary search on the constant c (the original
    where none)."""
    started = time.time()
    images, targets, _, thresholds = attack_inputs(images, targets, None, thresholds)
    attack = _carlini_program(scorer, images.shape[1:])
    best, best_l2 = images.copy(), np.full(len(images), np.inf, np.float32)
    for i in range(0, len(images), batch_size):
        part = slice(i, i + batch_size)
        const = np.full(len(images[part]), initial_const, np.float32)
        lower, upper = np.zeros_like(const), np.full_like(const, np.inf)
        for _ in range(search_steps):
            x, l2 = attack(images[part], targets[part], thresholds, const, steps,
                           learning_rate, confidence)
            better = l2 < best_l2[part]
            best[part][better], best_l2[part][better] = x[better], l2[better]
            found = np.isfinite(l2)
            upper = np.where(found, np.minimum(upper, const), upper)
            lower = np.where(found, lower, np.maximum(lower, const))
            const = np.where(np.isfinite(upper), (lower + upper) / 2, const * 10)
    return accepted_result(f"cw_accepted_k{confidence:g}", evaluator(scorer, images.shape[1:]),
                           best, targets, targets, thresholds, batch_size, started)

