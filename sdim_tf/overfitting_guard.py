"""Catastrophic overfitting of fast adversarial training, caught as it happens.

Training on one-step examples (FGSM) can within an epoch make the network robust to that
step only: FGSM accuracy jumps while PGD accuracy collapses towards 0 (Wong, Rice & Kolter
2020). After each epoch the guard attacks a fixed held-out batch with FGSM from a random
start and with multi-step PGD (`sdim_tf.robust.perturb`, the model's class scores in
inference mode) and names a collapse: PGD accuracy below `drop` times its best earlier value,
or FGSM accuracy more than `gap` above PGD's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from sdim_tf import robust


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Accuracy on the guard's batch under FGSM (random start) and PGD, in [0, 1]."""

    fgsm_accuracy: float
    pgd_accuracy: float


def collapse(history: list[Measurement], now: Measurement, drop: float = 0.5,
             gap: float = 0.3, least: float = 0.2) -> str | None:
    """Why `now` (after `history`) is catastrophic overfitting, or None. PGD accuracy counts
    as fallen only from a best earlier value of at least `least` (early epochs, never
    robust, are no collapse)."""
    best = max((m.pgd_accuracy for m in history), default=0.0)
    if best >= least and now.pgd_accuracy < drop * best:
        return (f"PGD accuracy {now.pgd_accuracy:.3f} fell below {drop:g} x its best "
                f"{best:.3f}")
    if now.fgsm_accuracy - now.pgd_accuracy > gap:
        return (f"FGSM accuracy {now.fgsm_accuracy:.3f} exceeds PGD accuracy "
                f"{now.pgd_accuracy:.3f} by more than {gap:g}")
    return None


class OverfittingGuard:
    """Measures `model` on (images, labels) at `epsilon` after each epoch; `check()` returns
    the measurement and why it collapsed (None if it did not), remembering the history.
    `seed`: the random starts, the same each epoch, so epochs differ only by the model."""

    def __init__(self, model, images, labels, epsilon: float, pgd_steps: int = 10,
                 drop: float = 0.5, gap: float = 0.3, seed: int = 0, batch_size: int = 256):
        self.model, self.epsilon, self.pgd_steps = model, epsilon, pgd_steps
        self.drop, self.gap, self.batch_size = drop, gap, batch_size
        self.images = tf.constant(np.asarray(images, np.float32))
        self.labels = tf.constant(np.asarray(labels, np.int32))
        rng = np.random.default_rng(seed)
        self.starts = [tf.constant(rng.uniform(-epsilon, epsilon, self.images.shape)
                                   .astype(np.float32)) for _ in range(2)]
        self.history: list[Measurement] = []
        self._accuracy = tf.function(self._accuracy_of)

    def _accuracy_of(self, images, labels, start, steps, step_size):
        def scores(x):
            return self.model(x, training=False)

        x = robust.perturb(scores, images, labels, self.epsilon, steps, step_size, start)
        return tf.reduce_sum(tf.cast(robust.margin_objective(scores(x), labels) < 0,
                                     tf.int32))

    def _attacked_accuracy(self, start, steps: int, step_size: float) -> float:
        correct = 0
        for i in range(0, int(self.labels.shape[0]), self.batch_size):
            part = slice(i, i + self.batch_size)
            correct += int(self._accuracy(self.images[part], self.labels[part], start[part],
                                          steps, step_size))
        return correct / max(int(self.labels.shape[0]), 1)

    def measure(self) -> Measurement:
        return Measurement(
            fgsm_accuracy=self._attacked_accuracy(self.starts[0], 1,
                                                  robust.FGSM_STEP * self.epsilon),
            pgd_accuracy=self._attacked_accuracy(self.starts[1], self.pgd_steps,
                                                 robust.PGD_PATH * self.epsilon
                                                 / self.pgd_steps))

    def check(self) -> tuple[Measurement, str | None]:
        now = self.measure()
        why = collapse(self.history, now, self.drop, self.gap)
        self.history.append(now)
        return now, why
