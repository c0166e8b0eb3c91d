"""Square Attack towards an undetected success: the gradient-free check that the gradient
attacks are not masked."""

from __future__ import annotations

import numpy as np

from sdim_tf.adversarial.accepted import evaluator
from sdim_tf.adversarial.grid import AcceptedCurve, over_epsilons, resume
from sdim_tf.adversarial.results import AttackResult

# after these many of 10,000 queries the window's share of the image halves (the paper's)
_SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def _stripes(restart, rng, images, epsilon, first):
    """Vertical stripes of +-epsilon per channel, drawn for every image."""
    n, _, w, channels = images.shape
    stripes = rng.choice([-epsilon, epsilon], (n, 1, w, channels))
    return np.clip(images + stripes, 0, 1).astype(np.float32)


def _square(scorer, images, labels, thresholds, epsilons, *, queries=1000, p_init=0.05,
            seed=0, batch_size=100, after=None):
    evaluate = evaluator(scorer, np.shape(images)[1:])

    def attack(clean, x, labels, targets, thresholds, epsilon, rng):
        n, h, w, channels = clean.shape
        _, loss, found = evaluate(x, labels, targets, thresholds, batch_size)
        for query in range(1, queries):
            active = np.flatnonzero(~found)
            if not active.size:
                break
            p = p_init / 2 ** np.searchsorted(_SQUARE_HALVINGS, int(query / queries * 10000))
            side = min(max(int(round(np.sqrt(p * h * w))), 1), min(h, w) - 1)
            top = rng.integers(0, h - side + 1, (len(active), 1))
            left = rng.integers(0, w - side + 1, (len(active), 1))
            rows, cols = np.arange(h), np.arange(w)
            window = (((rows >= top) & (rows < top + side))[:, :, None]
                      & ((cols >= left) & (cols < left + side))[:, None, :])[..., None]
            signs = rng.choice([-epsilon, epsilon], (len(active), 1, 1, channels))
            delta = np.where(window, signs, x[active] - clean[active])
            candidate = np.clip(clean[active] + delta, 0, 1).astype(np.float32)
            _, new_loss, hit = evaluate(candidate, labels[active], targets[active],
                                        thresholds, batch_size)
            keep = hit | (new_loss < loss[active])
            x[active[keep]], loss[active[keep]] = candidate[keep], new_loss[keep]
            found[active[keep]] = hit[keep]
        return x, loss, found

    return over_epsilons("square_accepted", attack, _stripes, scorer, images, labels,
                         thresholds, epsilons, batch_size=batch_size, seed=seed, after=after,
                         evaluate=evaluate)


def square_accepted(scorer, images, labels, thresholds, *, epsilon: float,
                    queries: int = 1000, p_init: float = 0.05, seed: int = 0,
                    batch_size: int = 100) -> AttackResult:
    """Square Attack, L-inf (Andriushchenko et al. 2020), on the untargeted `margin_loss`:
    gradient-free, so it checks that the gradient attacks are not masked. From vertical
    stripes of +-epsilon, each query sets a random square window to +-epsilon per channel
    and keeps it only where the loss falls; the window's area share p_init halves on the
    paper's schedule. At most `queries` forward passes per image."""
    return next(_square(scorer, images, labels, thresholds, (epsilon,), queries=queries,
                        p_init=p_init, seed=seed, batch_size=batch_size))


def square_accepted_curve(scorer, images, labels, thresholds, *, epsilons, done=(),
                          on_result=None, **options) -> AcceptedCurve:
    """`square_accepted` (same `options`) for each epsilon, carried over the grid: an
    image with an undetected success at one epsilon keeps it at the next, unattacked
    (`grid.over_epsilons`); the others start afresh from stripes."""
    return resume(lambda left, after: _square(scorer, images, labels, thresholds, left,
                                              after=after, **options),
                  epsilons, done, on_result)
