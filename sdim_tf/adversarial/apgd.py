"""AutoPGD (Croce & Hein 2020) towards an undetected success, L-inf or L2.

Ours rather than ART's: ART's `AutoProjectedGradientDescent` takes only its own losses
(cross-entropy, DLR) or the estimator's, and counts a misclassified image as done, however
the rule answers it. This one descends `margin_loss` (an accepted wrong class) and stops an
image at its first undetected success, with the reference implementation's step sizes:
2 epsilon at first, momentum 0.75, halved at checkpoints where the loss fell on at most
rho = 0.75 of the steps since the last one, or where the step was not halved last time and
the best loss has not fallen since; a halved image goes back to its best point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from sdim_tf.adversarial.accepted import float_scores, margin_loss, reached, specs
from sdim_tf.adversarial.grid import AcceptedCurve, first_then_random, over_epsilons, resume
from sdim_tf.adversarial.pgd import check_norm, into_ball, steepest
from sdim_tf.adversarial.results import AttackResult

MOMENTUM, RHO = 0.75, 0.75


def checkpoints(steps: int) -> list[int]:
    """The step counts after which APGD checks its step sizes: w_j = p_j * steps with
    p_0 = 0, p_1 = 0.22, p_(j+1) = p_j + max(p_j - p_(j-1) - 0.03, 0.06), in the reference
    implementation's integers (periods int(0.22 N), shrinking by int(0.03 N) down to
    int(0.06 N), each at least 1)."""
    period = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, done = [], period
    while done <= steps:
        points.append(done)
        period = max(period - shrink, shortest)
        done += period
    return points


def halve(falls, period, halved_before, best_before, best, rho: float = RHO) -> np.ndarray:
    """Which images halve their step at a checkpoint: the loss fell on at most rho of the
    `period` steps since the last checkpoint (`falls` of them), or the step was not halved
    there (`halved_before`) and the best loss (`best`) is no lower than it was then."""
    return (np.asarray(falls) <= rho * period) | (~np.asarray(halved_before, bool)
                                                  & (np.asarray(best) >= best_before))


def _apgd_program(scorer, norm: str, image_shape):
    check_norm(norm)
    images, ints, floats, scalar = specs(image_shape)
    sizes = tf.TensorSpec([None], tf.float32)

    def probe(x, labels, targets, thresholds, margin):
        with tf.GradientTape() as tape:
            tape.watch(x)
            scores = float_scores(scorer, x)
            loss = margin_loss(scores, labels, targets, thresholds, margin)
        return loss, reached(scores, labels, targets, thresholds), tape.gradient(loss, x)

    first = tf.function(probe, input_signature=[images, ints, ints, floats, scalar],
                        reduce_retracing=True)

    @tf.function(input_signature=[images, images, images, images, sizes, scalar, scalar,
                                  ints, ints, floats, scalar], reduce_retracing=True)
    def step(clean, x, x_before, gradient, eta, a, epsilon, labels, targets, thresholds,
             margin):
        """The next iterate and (loss, success, gradient) there."""
        z = into_ball(clean, x + eta[:, None, None, None] * steepest(-gradient, norm),
                      epsilon, norm)
        moved = into_ball(clean, x + a * (z - x) + (1 - a) * (x - x_before), epsilon, norm)
        return (moved, *probe(moved, labels, targets, thresholds, margin))

    def attack(clean, x, labels, targets, thresholds, epsilon, steps, margin):
        """From `x`: the first undetected success, else the iterate of the lowest loss."""
        loss, hit, gradient = (t.numpy() for t in first(x, labels, targets, thresholds,
                                                       margin))
        best, best_loss, best_gradient = x.copy(), loss.copy(), gradient.copy()
        x_before, eta = x.copy(), np.full(len(x), 2 * epsilon, np.float32)
        last, falls = loss.copy(), np.zeros(len(x))
        halved, best_then = np.ones(len(x), bool), loss.copy()
        found, active = hit.copy(), np.flatnonzero(~hit)
        points = checkpoints(steps)
        periods = dict(zip(points, np.diff([0, *points]), strict=True))
        for i in range(steps):
            if not len(active):
                break
            moved, loss, hit, g = (t.numpy() for t in step(
                clean[active], x[active], x_before[active], gradient[active], eta[active],
                1.0 if i == 0 else MOMENTUM, epsilon, labels[active], targets[active],
                thresholds, margin))
            x_before[active], x[active], gradient[active] = x[active], moved, g
            falls[active] += loss < last[active]
            last[active] = loss
            better = hit | (loss < best_loss[active])
            where = active[better]
            best[where], best_loss[where], best_gradient[where] = (
                moved[better], loss[better], g[better])
            found[active] = hit
            active = active[~hit]
            if i + 1 in periods:
                cut = active[halve(falls[active], periods[i + 1], halved[active],
                                   best_then[active], best_loss[active])]
                halved[active], best_then[active] = False, best_loss[active]
                halved[cut] = True
                eta[cut] /= 2
                x[cut], gradient[cut] = best[cut], best_gradient[cut]
                falls[:] = 0
        return best, best_loss, found

    return attack


def _apgd(scorer, images, labels, thresholds, epsilons, *, norm, steps, restarts=1,
          margin=0.0, targets=None, batch_size=100, seed=0, after=None):
    program = _apgd_program(scorer, norm, np.shape(images)[1:])

    def attack(clean, start, labels, targets, thresholds, epsilon, rng):
        return program(clean, start, labels, targets, thresholds, epsilon, steps, margin)

    return over_epsilons(f"apgd_accepted_l{norm}", attack, first_then_random(norm), scorer,
                         images, labels, thresholds, epsilons, restarts=restarts,
                         targets=targets, batch_size=batch_size, seed=seed, after=after)


def apgd_accepted(scorer, images, labels, thresholds, *, norm: str, epsilon: float,
                  steps: int, restarts: int = 1, margin: float = 0.0, targets=None,
                  batch_size: int = 100, seed: int = 0) -> AttackResult:
    """AutoPGD (L-inf or L2) on `margin_loss` inside the epsilon ball and [0, 1]: per image
    the first undetected success (of its target, given `targets`), else the iterate of the
    lowest loss; `steps` gradient steps per start. Restarts after the first start (from the
    image) at random in the ball, each on the images still without a success."""
    return next(_apgd(scorer, images, labels, thresholds, (epsilon,), norm=norm, steps=steps,
                      restarts=restarts, margin=margin, targets=targets,
                      batch_size=batch_size, seed=seed))


def apgd_accepted_curve(scorer, images, labels, thresholds, *, epsilons, norm: str,
                        steps: int, done: Sequence[AttackResult] = (),
                        on_result: Callable[[int, AttackResult], None] | None = None,
                        **options) -> AcceptedCurve:
    """`apgd_accepted` (same `options`) for each epsilon, carried over the grid as
    `pgd_accepted_curve` is: each epsilon attacks only the images without an undetected
    success at the one before, starting them from its result."""
    return resume(lambda left, after: _apgd(scorer, images, labels, thresholds, left,
                                            norm=norm, steps=steps, after=after, **options),
                  epsilons, done, on_result)
