"""Attacks over a growing grid of budgets, carried over.

An undetected success within epsilon lies within every larger epsilon, so there it counts
without being attacked again: each epsilon attacks only the images still without one, and
within an epsilon each start (restart) only the images still without one. A curve's point
keeps its meaning (the share of images with an undetected success within that budget) at
a fraction of the work where most images fall early.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from sdim_tf.adversarial.accepted import accepted_result, attack_inputs, evaluator
from sdim_tf.adversarial.results import AttackResult

# attack(clean, starts, labels, targets, thresholds, epsilon, rng) on one batch ->
# (images, their loss, whether each is an undetected success)
BatchAttack = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
# starts(restart, rng, images, epsilon, first) -> the starting images of that restart
Starts = Callable[[int, np.random.Generator, np.ndarray, float, np.ndarray], np.ndarray]


def carried_over(epsilons, success) -> np.ndarray:
    """bool [E, N]: the undetected successes of each grid point taken over from the point
    before it (when the budget did not shrink) rather than found there. `success`:
    bool [E, N] of a curve from `over_epsilons`."""
    success = np.asarray(success, bool)
    grows = np.r_[False, np.diff(np.asarray(epsilons, float)) >= 0]
    before = np.concatenate([np.zeros_like(success[:1]), success[:-1]])
    return before & grows[:, None]


def random_starts(rng, images, epsilon, norm):
    """Uniform in the epsilon ball (then clipped to [0, 1])."""
    if norm == "inf":
        delta = rng.uniform(-epsilon, epsilon, images.shape)
    else:
        delta = rng.standard_normal(images.shape)
        flat = delta.reshape(len(images), -1)
        radius = epsilon * rng.uniform(0, 1, len(images)) ** (1 / flat.shape[1])
        delta *= (radius / np.linalg.norm(flat, axis=1))[:, None, None, None]
    return np.clip(images + delta, 0, 1).astype(np.float32)


def first_then_random(norm: str) -> Starts:
    """The first start from the image (or the previous epsilon's result), the others at
    random in the ball, drawn for every image so that an image's start does not depend on
    the others."""
    def starts(restart, rng, images, epsilon, first):
        return first if restart == 0 else random_starts(rng, images, epsilon, norm)
    return starts


def over_epsilons(name: str, attack: BatchAttack, starts: Starts, scorer, images, labels,
                  thresholds, epsilons, *, restarts: int = 1, targets=None,
                  batch_size: int = 100, seed: int = 0, after=None, evaluate=None
                  ) -> Iterator[AttackResult]:
    """`attack`'s result for each epsilon (a fresh generator seeded `seed` at each). Over a
    growing grid each epsilon takes over the previous one's undetected successes (its
    images, re-checked) and starts the others from the previous result; each start attacks
    only the images still without a success, which keeps the first found. `after`:
    (epsilon, result) of the grid point before the first, when a curve resumes; `evaluate`:
    the attack's own `accepted.evaluator` of `scorer`, if it has one."""
    images, labels, targets, thresholds = attack_inputs(images, labels, targets, thresholds)
    evaluate = evaluate or evaluator(scorer, images.shape[1:])
    previous, previous_epsilon = images, -np.inf
    previous_found = np.zeros(len(images), bool)
    if after is not None:
        previous_epsilon, previous, previous_found = after[0], after[1].adversarial, \
            after[1].success
    for epsilon in epsilons:
        started, rng = time.time(), np.random.default_rng(seed)
        best, best_loss = images.copy(), np.full(len(images), np.inf, np.float32)
        found = np.zeros(len(images), bool)
        if epsilon >= previous_epsilon:  # the previous successes lie inside this ball
            first, found[:] = previous, previous_found
            best[found], best_loss[found] = previous[found], 0.0
        else:
            first = images
        for restart in range(restarts):
            begin = starts(restart, rng, images, epsilon, first)
            left = np.flatnonzero(~found)
            for i in range(0, len(left), batch_size):
                part = left[i:i + batch_size]
                x, loss, hit = attack(images[part], begin[part], labels[part], targets[part],
                                      thresholds, epsilon, rng)
                keep = hit | (loss < best_loss[part])
                best[part[keep]], best_loss[part[keep]] = x[keep], loss[keep]
                found[part] |= hit
        result = accepted_result(name, evaluate, best, labels, targets, thresholds,
                                 batch_size, started)
        # the re-checked successes carry on, so the reported curve never falls
        previous, previous_epsilon, previous_found = best, epsilon, result.success
        yield result


@dataclasses.dataclass(frozen=True)
class AcceptedCurve:
    """Undetected successes of an attack over a grid of epsilons (`over_epsilons`)."""

    epsilons: tuple[float, ...]
    success: np.ndarray  # bool [len(epsilons), N], undetected successes
    adversarial: np.ndarray | None = None  # [len(epsilons), N, ...], the returned images
    scores: np.ndarray | None = None  # [len(epsilons), N, C], their class scores
    seconds: float = 0.0

    @property
    def shares(self) -> list[float]:
        return [float(s.mean()) for s in self.success]

    @property
    def carried(self) -> np.ndarray:
        """bool [E, N]: successes taken over from the epsilon before, not attacked again."""
        return carried_over(self.epsilons, self.success)

    def smallest_epsilon(self) -> np.ndarray:
        """Per image the smallest epsilon of the grid at which the attack succeeded (inf if
        never): its perturbation size, for the median."""
        grid = np.where(self.success, np.asarray(self.epsilons, float)[:, None], np.inf)
        return grid.min(0)


def curve(results, epsilons) -> AcceptedCurve:
    """The results of `over_epsilons` (one per epsilon) as one curve."""
    results = list(results)
    return AcceptedCurve(tuple(epsilons), np.stack([r.success for r in results]),
                         np.stack([r.adversarial for r in results]),
                         np.stack([r.logits for r in results]),
                         sum(r.seconds for r in results))


def resume(generate, epsilons, done: Sequence[AttackResult] = (),
           on_result: Callable[[int, AttackResult], None] | None = None) -> AcceptedCurve:
    """The curve of `generate(epsilons left, after)` (an `over_epsilons` generator) over
    `epsilons`, after the results `done` of its first epsilons; `on_result(i, result)`
    hears of each new one as it finishes."""
    epsilons, results = tuple(epsilons), list(done)
    after = (epsilons[len(done) - 1], done[-1]) if done else None
    for result in generate(epsilons[len(done):], after):
        if on_result is not None:
            on_result(len(results), result)
        results.append(result)
    return curve(results, epsilons)
