"""The per-image worst case over attacks: an image falls within a budget when any attack
found it an undetected success (a wrong class the rule accepts) whose perturbation, as
measured, lies within that budget."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# float32 rounding of a projection onto the ball: a point found at epsilon measures up to
# a few ulps over it
_RELATIVE, _ABSOLUTE = 1e-5, 1e-6


def perturbation_sizes(adversarial, original, norm: str) -> np.ndarray:
    """Per row, the L-inf (`norm` "inf") or L2 ("2") norm of adversarial - original."""
    delta = (np.asarray(adversarial, np.float64) - np.asarray(original, np.float64))
    delta = delta.reshape(len(delta), -1)
    return np.abs(delta).max(1) if norm == "inf" else np.linalg.norm(delta, axis=1)


def within(sizes, epsilon: float) -> np.ndarray:
    """Whether each size lies within the budget (up to float32 rounding)."""
    return np.asarray(sizes) <= epsilon * (1 + _RELATIVE) + _ABSOLUTE


def success_within(positions, sizes, undetected, epsilons, images: int) -> np.ndarray:
    """bool [E, images]: per epsilon, the images with an undetected success within it.
    One row per adversarial example: `positions` (which image it is of, in [0, images);
    others are left out), `sizes` (its perturbation's norm), `undetected`."""
    positions, undetected = np.asarray(positions), np.asarray(undetected, bool)
    sizes = np.asarray(sizes, np.float64)
    mask = np.zeros((len(epsilons), images), bool)
    counted = undetected & (positions < images)
    for e, epsilon in enumerate(epsilons):
        mask[e, positions[counted & within(sizes, epsilon)]] = True
    return mask


def worst_case(masks: Mapping[str, np.ndarray]) -> dict:
    """From each attack's bool [E, N] (`success_within`): "undetected" bool [E, N], the
    union; per attack "found" (images it broke, per epsilon) and "only" (those no other
    attack broke)."""
    masks = {name: np.asarray(m, bool) for name, m in masks.items()}
    stacked = np.stack(list(masks.values()))  # [A, E, N]
    union, count = stacked.any(0), stacked.sum(0)
    return {"undetected": union,
            "found": {n: m.sum(1).tolist() for n, m in masks.items()},
            "only": {n: (m & (count == 1)).sum(1).tolist() for n, m in masks.items()}}
