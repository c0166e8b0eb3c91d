"""What an attack returns, and how its success and detection are counted.

Adversarial examples are "detected" when the rejection rule (equation 9) refuses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from sdim_tf import rejection


@dataclasses.dataclass
class AttackResult:
    """Adversarial examples of `images` (the originals where the attack failed)."""

    name: str
    adversarial: np.ndarray
    logits: np.ndarray  # of the adversarial examples
    success: np.ndarray  # bool [N]
    seconds: float
    targets: np.ndarray | None = None

    def l2(self, images: np.ndarray) -> np.ndarray:
        return l2_distances(self.adversarial, images)


def l2_distances(adversarial: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per image, the L2 norm of the perturbation [N]."""
    return np.sqrt(((adversarial - images) ** 2).reshape(len(images), -1).sum(1))


def first_correct(logits: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first `limit` correctly classified samples (the paper attacks only
    those)."""
    return np.flatnonzero(np.argmax(logits, 1) == np.asarray(labels))[:limit]


def detection_rates(logits: np.ndarray, success: np.ndarray,
                    thresholds: Mapping[float, np.ndarray]) -> dict:
    """Per percentile: the share of successful adversarial examples that the rule rejects
    (None when the attack never succeeded)."""
    success = np.asarray(success, bool)
    rates = {}
    for p, t in thresholds.items():
        if not success.any():
            rates[p] = None
            continue
        rejected = rejection.decide(np.asarray(logits)[success], t).rejected.numpy()
        rates[p] = float(rejected.mean())
    return rates


def untargeted_success(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.argmax(logits, 1) != np.asarray(labels)


def targeted_success(logits: np.ndarray, targets: np.ndarray, confidence: float) -> np.ndarray:
    """The target wins by at least `confidence` (CW's criterion; strictly when it is 0)."""
    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(logits))
    target = logits[rows, targets]
    others = logits.copy()
    others[rows, targets] = -np.inf
    gap = target - others.max(1)
    return (gap > 0) & (gap >= confidence)
