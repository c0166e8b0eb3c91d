"""PGD towards an undetected success (L-inf or L2), alone or over a grid of epsilons."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from sdim_tf.adversarial.accepted import float_scores, margin_loss, reached, specs
from sdim_tf.adversarial.grid import (
    AcceptedCurve,
    Starts,
    first_then_random,
    over_epsilons,
    resume,
)
from sdim_tf.adversarial.results import AttackResult
from sdim_tf.adversarial.settings import SCHEDULES

NORMS = ("inf", "2")
# where the adaptive PGD starts: the image (then at random in the ball), or an image of
# another class projected into the ball (`from_other_classes`)
STARTS = ("image", "other_classes")


def _per_image_l2(t):
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=[1, 2, 3], keepdims=True))


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")


def steepest(descent, norm: str):
    """The unit step of steepest descent under the norm."""
    if norm == "inf":
        return tf.sign(descent)
    return descent / tf.maximum(_per_image_l2(descent), 1e-12)


def into_ball(clean, moved, epsilon, norm: str):
    """`moved` projected into the epsilon ball around `clean`, then into [0, 1]."""
    delta = moved - clean
    if norm == "inf":
        delta = tf.clip_by_value(delta, -epsilon, epsilon)
    else:
        delta *= tf.minimum(1.0, epsilon / tf.maximum(_per_image_l2(delta), 1e-12))
    return tf.clip_by_value(clean + delta, 0.0, 1.0)


def pgd_program(scorer, norm: str, image_shape):
    check_norm(norm)
    images, ints, floats, scalar = specs(image_shape)

    # One compiled step, the loop in Python, so that images that succeed leave the batch
    # (1.15-1.3x faster than the whole loop compiled, on a 10-epoch MNIST model).
    @tf.function(input_signature=[images, images, ints, ints, floats, scalar, scalar, scalar],
                 reduce_retracing=True)
    def step(clean, x, labels, targets, thresholds, epsilon, step_size, margin):
        """(margin loss at x, whether x is an undetected success, the next iterate)."""
        with tf.GradientTape() as tape:
            tape.watch(x)
            scores = float_scores(scorer, x)
            loss = margin_loss(scores, labels, targets, thresholds, margin)
        moved = x + step_size * steepest(-tape.gradient(loss, x), norm)
        return (loss, reached(scores, labels, targets, thresholds),
                into_ball(clean, moved, epsilon, norm))

    def attack(clean, x, labels, targets, thresholds, epsilon, step_sizes, margin,
               until_success=True):
        """From `x`, one step per entry of `step_sizes` (the last evaluates only): the first
        undetected success, else the iterate of the lowest loss. `until_success` False:
        every step for every image, the iterate of the lowest loss (and whether it is an
        undetected success)."""
        best, best_loss = x.copy(), np.full(len(x), np.inf, np.float32)
        found, active = np.zeros(len(x), bool), np.arange(len(x))
        for step_size in step_sizes:
            loss, hit, following = (t.numpy() for t in step(
                clean[active], x, labels[active], targets[active], thresholds, epsilon,
                step_size, margin))
            if not until_success:
                keep = loss < best_loss
                best[keep], best_loss[keep], found[keep] = x[keep], loss[keep], hit[keep]
                x = following
                continue
            keep = hit | (loss < best_loss[active])
            best[active[keep]], best_loss[active[keep]] = x[keep], loss[keep]
            found[active] = hit
            x, active = following[~hit], active[~hit]
            if not len(active):
                break
        return best, best_loss, found

    return attack


def step_sizes(epsilon: float, steps: int, schedule: str = "cosine",
               step_size: float | None = None, first_step: float = 1.0) -> np.ndarray:
    """[steps + 1] PGD step sizes. constant: `step_size`, by default 2.5 * epsilon / steps
    (Madry et al.; the path length stays 2.5 epsilon whatever the steps). cosine: from
    `step_size`, by default `first_step` * epsilon, down to 0 along half a cosine, so that
    more steps search longer and end finer."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return np.full(steps + 1, 2.5 * epsilon / steps if step_size is None else step_size)
    first = first_step * epsilon if step_size is None else step_size
    return first * 0.5 * (1 + np.cos(np.pi * np.arange(steps + 1) / steps))


def nearest_of_other_classes(images, labels, count: int | None = None,
                             chunk: int = 1024) -> np.ndarray:
    """int [N, M]: per image the images of other labels, nearest first (L2 in pixels), M
    the fewest any image has (at most `count`); where every image has one label, each gets
    itself. Distances are taken `chunk` rows at a time, so memory grows as N, not N^2."""
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    labels = np.asarray(labels)
    _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    others = len(labels) - sizes[inverse]
    width = max(int(others.min()) if len(others) else 1, 1)
    width = width if count is None else max(min(width, count), 1)
    squared = (flat ** 2).sum(1)
    order = np.empty((len(flat), width), np.int64)
    for begin in range(0, len(flat), chunk):
        rows = slice(begin, begin + chunk)
        distances = squared[rows, None] + squared[None, :] - 2 * flat[rows] @ flat.T
        distances[labels[rows, None] == labels[None, :]] = np.inf
        order[rows] = np.argsort(distances, axis=1, kind="stable")[:, :width]
    order[others == 0] = np.flatnonzero(others == 0)[:, None]
    return order


def from_other_classes(images, labels, norm: str, restarts: int | None = None) -> Starts:
    """Start r: per image its r-th nearest image of another class (of `images` itself,
    cycling when r runs past them; only the first `restarts` are sorted) projected into
    the epsilon ball. When `images` are images the rule accepts, a budget that holds the
    whole move starts at an undetected success (the L-inf ball of radius 1: Carlini et
    al.'s unbounded check); smaller ones descend from inside another class's accepted
    region instead of from the image."""
    pool = np.asarray(images, np.float32)
    order = nearest_of_other_classes(images, labels, count=restarts)

    def starts(restart, rng, clean, epsilon, first):
        if not len(clean):
            return clean
        other = pool[order[:, restart % order.shape[1]]]
        return into_ball(clean, other, np.float32(epsilon), norm).numpy()
    return starts


def _pgd(scorer, images, labels, thresholds, epsilons, *, norm, steps, step_size=None,
         schedule="cosine", first_step=1.0, restarts=1, margin=0.0, targets=None,
         batch_size=100, seed=0, after=None, start="image"):
    """pgd_accepted's result for each epsilon, carried over the grid (`over_epsilons`), the
    compiled step traced once for all. Starting from the image, the first start at each
    epsilon is the previous epsilon's result (inside the larger ball)."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    program = pgd_program(scorer, norm, np.shape(images)[1:])

    def attack(clean, begin, labels, targets, thresholds, epsilon, rng):
        return program(clean, begin, labels, targets, thresholds, epsilon,
                       step_sizes(epsilon, steps, schedule, step_size, first_step), margin)

    starts = first_then_random(norm) if start == "image" else \
        from_other_classes(images, labels, norm, restarts)
    return over_epsilons(f"pgd_accepted_l{norm}", attack, starts, scorer,
                         images, labels, thresholds, epsilons, restarts=restarts,
                         targets=targets, batch_size=batch_size, seed=seed, after=after)


def pgd_accepted(scorer, images, labels, thresholds, *, norm: str, epsilon: float,
                 steps: int, step_size: float | None = None, schedule: str = "cosine",
                 first_step: float = 1.0, restarts: int = 1, margin: float = 0.0,
                 targets=None, batch_size: int = 100, seed: int = 0,
                 start: str = "image") -> AttackResult:
    """PGD (L-inf or L2, `norm` "inf" or "2") on `margin_loss` inside the epsilon ball and
    [0, 1]: per image the first undetected success (of its target, given `targets`), else
    the iterate of the lowest loss. `start` "image": from the image, restarts at random in
    the ball; "other_classes": each start from an image of another class of `images`
    (`from_other_classes`). Each restart attacks the images still without a success. Step
    sizes: `step_sizes` of the `schedule` (and `first_step`)."""
    return next(_pgd(scorer, images, labels, thresholds, (epsilon,), norm=norm, steps=steps,
                     step_size=step_size, schedule=schedule, first_step=first_step,
                     restarts=restarts, margin=margin, targets=targets,
                     batch_size=batch_size, seed=seed, start=start))


def pgd_accepted_curve(scorer, images, labels, thresholds, *, epsilons, norm: str,
                       steps: int, done: Sequence[AttackResult] = (),
                       on_result: Callable[[int, AttackResult], None] | None = None,
                       **options) -> AcceptedCurve:
    """`pgd_accepted` (same `options`) for each epsilon, carried over the grid: each
    epsilon attacks only the images without an undetected success at the one before, and
    starts them from its result (see `grid.over_epsilons`). `on_result(i, result)` hears of
    each epsilon as it finishes; given those results of the first epsilons as `done`, a
    curve that was stopped goes on where it stopped, with the same result as if it had
    not."""
    return resume(lambda left, after: _pgd(scorer, images, labels, thresholds, left,
                                           norm=norm, steps=steps, after=after, **options),
                  epsilons, done, on_result)
