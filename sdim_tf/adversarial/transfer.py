"""Transfer attack: adversarial examples crafted on another model (the source) by the
adaptive PGD, judged on the attacked model (the target) under its deployed rule.

A gradient-masked or obfuscated target can stop gradient attacks on itself and still fall
to examples made on a model whose gradients work. On the source every step of the PGD runs
and the loss has no hinge (`margin_loss` with margin inf): the example goes as deep into an
accepted wrong class of the source as the budget allows, which transfers better than the
first example the source accepts. The target is only queried for its answer: the first
undetected success over the restarts, else the example of the lowest margin loss.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from sdim_tf.adversarial.accepted import evaluator, packed_rule
from sdim_tf.adversarial.grid import AcceptedCurve, first_then_random, over_epsilons, resume
from sdim_tf.adversarial.pgd import pgd_program, step_sizes


def transfer_accepted_curve(source, source_rule, target, target_rule, images, labels, *,
                            epsilons, steps: int, norm: str = "inf", restarts: int = 1,
                            schedule: str = "cosine", first_step: float = 1.0,
                            batch_size: int = 100, seed: int = 0, done=(), on_result=None
                            ) -> tuple[AcceptedCurve, np.ndarray]:
    """(the target's curve of undetected successes, bool [E, N] whether each returned image
    is also one on the source under `source_rule`). `source`, `target`: scorers (images ->
    class scores); rules: `Acceptance` or thresholds [C]. Carried over the grid on the
    target (`grid.over_epsilons`): an image the target accepts in a wrong class at one
    epsilon is not crafted again at the next."""
    shape = np.shape(images)[1:]
    craft = pgd_program(source, norm, shape)
    on_source = tf.constant(packed_rule(source_rule), tf.float32)
    evaluate = evaluator(target, shape)

    def attack(clean, start, labels, targets, thresholds, epsilon, rng):
        x, _, _ = craft(clean, start, labels, targets, on_source, epsilon,
                        step_sizes(epsilon, steps, schedule, first_step=first_step), np.inf,
                        until_success=False)
        _, loss, hit = evaluate(x, labels, targets, thresholds, batch_size)
        return x, loss, hit

    curve = resume(lambda left, after: over_epsilons(
        "transfer_accepted", attack, first_then_random(norm), target, images, labels,
        target_rule, left, restarts=restarts, batch_size=batch_size, seed=seed, after=after,
        evaluate=evaluate), epsilons, done, on_result)
    judge = evaluator(source, shape)
    labels = np.asarray(labels, np.int32)
    untargeted = np.full(len(labels), -1, np.int32)
    source_success = np.stack([judge(x, labels, untargeted, on_source, batch_size)[2]
                               for x in curve.adversarial])
    return curve, source_success
