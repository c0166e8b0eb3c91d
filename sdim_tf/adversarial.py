"""Adversarial evaluation (paper section 5.3, appendix D) on adversarial-robustness-toolbox.

The attacks see the model's logits: for SDIM the summed class-conditional log-likelihoods.
Cross-entropy attacks (FGSM, PGD) apply softmax to them (appendix D.1); DeepFool and CW-L2
use them as they are, so CW's confidence kappa is on the log-likelihood scale. Adversarial
examples are "detected" when the rejection rule (equation 9) refuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping

import numpy as np
import tensorflow as tf

from sdim_tf import rejection

CURVE_ATTACKS = ("fgsm", "pgd")
UNTARGETED_ATTACKS = ("deepfool", "boundary", "local_search")
ATTACKS = (*CURVE_ATTACKS, *UNTARGETED_ATTACKS, "cw_l2")


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """Caps sized for a 2-core CPU; the paper attacks the first 1000 test images."""

    images: int = 100  # first test images for the curves and the untargeted attacks
    epsilons: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    pgd_steps: int = 10  # cleverhans' default, as the paper used
    pgd_step_size: float = 0.05  # cleverhans' eps_iter default (capped at epsilon)
    deepfool_steps: int = 50
    # cleverhans' overshoot, as the paper used; ART's 1e-6 leaves examples on the boundary,
    # where rounding on another CPU decides the class.
    deepfool_overshoot: float = 0.02
    boundary_steps: int = 50  # ART's default 5000 takes about 10 min per image here
    local_search_rounds: int = 30  # Narodytska & Kasiviswanathan use 150
    cw_images: int = 10  # each attacked towards all 9 other classes, for every confidence
    cw_confidences: tuple[float, ...] = (0.0, 500.0, 1000.0)
    cw_steps: int = 10
    cw_search_steps: int = 5
    batch_size: int = 100
    seed: int = 0


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
        return np.sqrt(((self.adversarial - images) ** 2).reshape(len(images), -1).sum(1))


def _require_art():
    try:
        import art  # noqa: F401
    except ImportError as e:
        raise ImportError("adversarial attacks need adversarial-robustness-toolbox: "
                          "pip install 'sdim-tf[attacks]'") from e


@functools.cache
def _classifier_class():
    _require_art()
    from art.estimators.classification import TensorFlowV2Classifier

    class Classifier(TensorFlowV2Classifier):
        """ART's classifier with batched, compiled predictions and gradients (ART's own are
        eager and predict the whole input at once)."""

        def __init__(self, model, num_classes: int, input_shape, batch_size: int):
            def logits(images, training=False):
                return tf.cast(model(images, training=False), tf.float32)

            super().__init__(model=logits, nb_classes=num_classes,
                             input_shape=tuple(input_shape), clip_values=(0.0, 1.0),
                             loss_object=tf.keras.losses.CategoricalCrossentropy(
                                 from_logits=True))
            self._batch = batch_size
            spec = tf.TensorSpec([None, *input_shape], tf.float32)
            self._logits = tf.function(logits, input_signature=[spec], reduce_retracing=True)

            @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int32)])
            def picked_gradient(images, labels):
                with tf.GradientTape() as tape:
                    tape.watch(images)
                    picked = tf.gather(logits(images), labels, axis=1, batch_dims=1)
                return tape.gradient(picked, images)

            @tf.function(input_signature=[spec])
            def jacobian(images):
                with tf.GradientTape() as tape:
                    tape.watch(images)
                    out = logits(images)
                return tape.batch_jacobian(out, images)  # [N, C, *input_shape], as ART's

            @tf.function(input_signature=[spec, tf.TensorSpec([None, num_classes], tf.float32)])
            def loss_gradient(images, onehot):
                with tf.GradientTape() as tape:
                    tape.watch(images)
                    loss = tf.nn.softmax_cross_entropy_with_logits(onehot, logits(images))
                return tape.gradient(loss, images)

            self._picked_gradient, self._jacobian = picked_gradient, jacobian
            self._loss_gradient = loss_gradient

        def _batched(self, fn, *arrays):
            n = len(arrays[0])
            if n == 0:
                return fn(*(a[:0] for a in arrays)).numpy()
            return np.concatenate([fn(*(a[i:i + self._batch] for a in arrays)).numpy()
                                   for i in range(0, n, self._batch)])

        def predict(self, x, batch_size=None, training_mode=False, **kwargs):
            return self._batched(self._logits, np.asarray(x, np.float32))

        def class_gradient(self, x, label=None, training_mode=False, **kwargs):
            x = np.asarray(x, np.float32)
            if label is None:
                return self._batched(self._jacobian, x)
            labels = np.broadcast_to(np.asarray(label, np.int32), (len(x),))
            return self._batched(self._picked_gradient, x, labels)[:, None]

        def loss_gradient(self, x, y, training_mode=False, **kwargs):
            onehot = np.asarray(y, np.float32)
            if onehot.ndim == 1:
                onehot = np.eye(self.nb_classes, dtype=np.float32)[onehot.astype(int)]
            if isinstance(x, tf.Tensor):  # ART's TF PGD calls this inside its own loop
                return self._loss_gradient(tf.cast(x, tf.float32), tf.convert_to_tensor(onehot))
            return self._batched(self._loss_gradient, np.asarray(x, np.float32), onehot)

    return Classifier


def art_classifier(model, num_classes: int, input_shape, batch_size: int = 100):
    """An ART `TensorFlowV2Classifier` over `model(images) -> logits [N, C]`, inputs in [0, 1]."""
    return _classifier_class()(model, num_classes, input_shape, batch_size)


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


def _result(name, classifier, adversarial, success_fn, started, targets=None) -> AttackResult:
    """Success is re-checked on the returned images by the forward pass the report uses."""
    adversarial = np.asarray(adversarial, np.float32)
    logits = classifier.predict(adversarial)
    return AttackResult(name, adversarial, logits, success_fn(logits), time.time() - started,
                        targets)


def _with_seed(seed: int):
    np.random.seed(seed)  # ART draws its random starts from numpy's global generator
    tf.random.set_seed(seed)


def accuracy_curve(classifier, images: np.ndarray, labels: np.ndarray, attack: str,
                   settings: AttackSettings) -> list[float]:
    """Accuracy under FGSM or randomised PGD-Linf for each epsilon (Figures 4 and 5)."""
    _require_art()
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    accuracies = []
    for eps in settings.epsilons:
        if eps == 0:
            adversarial = images
        elif attack == "fgsm":
            adversarial = FastGradientMethod(classifier, norm=np.inf, eps=eps,
                                             batch_size=settings.batch_size).generate(images)
        elif attack == "pgd":
            _with_seed(settings.seed)
            adversarial = ProjectedGradientDescent(
                classifier, norm=np.inf, eps=eps, eps_step=min(settings.pgd_step_size, eps),
                max_iter=settings.pgd_steps, num_random_init=1, batch_size=settings.batch_size,
                verbose=False).generate(images)
        else:
            raise ValueError(f"accuracy curves are for {CURVE_ATTACKS}, got {attack!r}")
        accuracies.append(float((classifier.predict(adversarial).argmax(1) == labels).mean()))
    return accuracies


def deepfool(classifier, images, labels, settings: AttackSettings) -> AttackResult:
    _require_art()
    from art.attacks.evasion import DeepFool

    started = time.time()
    adversarial = DeepFool(classifier, max_iter=settings.deepfool_steps,
                           epsilon=settings.deepfool_overshoot, nb_grads=classifier.nb_classes,
                           batch_size=settings.batch_size, verbose=False).generate(images)
    return _result("deepfool", classifier, adversarial,
                   lambda lg: untargeted_success(lg, labels), started)


def boundary(classifier, images, labels, settings: AttackSettings) -> AttackResult:
    _require_art()
    from art.attacks.evasion import BoundaryAttack

    started = time.time()
    _with_seed(settings.seed)
    attack = BoundaryAttack(classifier, targeted=False, max_iter=settings.boundary_steps,
                            batch_size=settings.batch_size, verbose=False)
    adversarial = attack.generate(images, y=np.eye(classifier.nb_classes)[labels])
    return _result("boundary", classifier, adversarial,
                   lambda lg: untargeted_success(lg, labels), started)


def carlini_l2(classifier, images, targets, confidence: float,
               settings: AttackSettings) -> AttackResult:
    """Targeted CW-L2 (Tables 6 and 7); success needs the target ahead by `confidence`."""
    _require_art()
    from art.attacks.evasion import CarliniL2Method

    started = time.time()
    adversarial = CarliniL2Method(
        classifier, confidence=confidence, targeted=True, max_iter=settings.cw_steps,
        binary_search_steps=settings.cw_search_steps, batch_size=settings.batch_size,
        verbose=False).generate(images, y=np.eye(classifier.nb_classes)[targets])
    return _result(f"cw_l2_k{confidence:g}", classifier, adversarial,
                   lambda lg: targeted_success(lg, targets, confidence), started, targets)


def local_search(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                 labels: np.ndarray, *, rounds: int = 150, p: float = 10.0, r: float = 1.5,
                 d: int = 5, t: int = 5, k: int = 1, initial_fraction: float = 0.1,
                 max_candidates: int = 128,
                 bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """LocalSearch (Narodytska & Kasiviswanathan 2016, Algorithm 3), untargeted, black-box.

    Each round scores candidate pixels by how much setting them to p * sign(pixel) (in the
    [-1/2, 1/2]-centred scale) lowers the true class, multiplies the t best by r with cyclic
    wrap-around in bounds, stops when the true class leaves the top k, and takes the next
    candidates from the (2d+1)^2 neighbourhoods of the perturbed pixels. The score is the
    log-softmax of the true class: the paper's probability, without float ties at 1.0.
    As in Foolbox, each round scores a random subset of at most `max_candidates` pixels.
    `predict` maps images [B, H, W, C] to logits [B, classes]. Returns (adversarial,
    success); a failed image comes back unchanged.
    """
    low, high = bounds
    centre, scale = (low + high) / 2, high - low
    rng = np.random.default_rng(seed)
    images = np.asarray(images, np.float32)
    n, h, w = images.shape[:3]
    states = (images - centre) / scale  # in [-1/2, 1/2]
    adversarial = images.copy()
    success = np.zeros(n, bool)
    count = max(1, int(round(initial_fraction * h * w)))
    candidates = [np.stack(np.unravel_index(rng.choice(h * w, count, replace=False), (h, w)), 1)
                  for _ in range(n)]

    def to_images(s):
        return (s * scale + centre).astype(np.float32)

    def true_class_score(logits, label):
        logits = np.asarray(logits, np.float64)
        top = logits.max(1, keepdims=True)
        return logits[:, label] - top[:, 0] - np.log(np.exp(logits - top).sum(1))

    offsets = np.arange(-d, d + 1)
    window = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), -1)  # [2d+1, 2d+1, 2]
    active = list(range(n))
    for _ in range(rounds):
        if not active:
            break
        probes = []
        for i in active:
            if len(candidates[i]) > max_candidates:
                candidates[i] = candidates[i][rng.choice(len(candidates[i]), max_candidates,
                                                         replace=False)]
            batch = np.repeat(states[i][None], len(candidates[i]), 0)
            rows, cols = candidates[i][:, 0], candidates[i][:, 1]
            batch[np.arange(len(rows)), rows, cols] = p * np.sign(states[i][rows, cols])
            probes.append(batch)
        scores = predict(to_images(np.concatenate(probes)))
        offset, chosen = 0, {}
        for i, batch in zip(active, probes, strict=True):
            score = true_class_score(scores[offset:offset + len(batch)], labels[i])
            offset += len(batch)
            chosen[i] = candidates[i][np.argsort(score, kind="stable")[:t]]
            rows, cols = chosen[i][:, 0], chosen[i][:, 1]
            values = r * states[i][rows, cols]
            states[i][rows, cols] = np.where(values < -0.5, values + 1,
                                             np.where(values > 0.5, values - 1, values))
        logits = predict(to_images(states[active]))
        ranks = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
        still = []
        for i, top in zip(active, ranks, strict=True):
            if labels[i] not in top:
                success[i] = True
                adversarial[i] = to_images(states[i])
                continue
            near = chosen[i][:, None, None, :] + window
            near = near.reshape(-1, 2)
            inside = (near[:, 0] >= 0) & (near[:, 0] < h) & (near[:, 1] >= 0) & (near[:, 1] < w)
            candidates[i] = np.unique(near[inside], axis=0)
            still.append(i)
        active = still
    return adversarial, success


def local_search_attack(classifier, images, labels, settings: AttackSettings) -> AttackResult:
    started = time.time()
    adversarial, _ = local_search(classifier.predict, images, labels,
                                  rounds=settings.local_search_rounds, seed=settings.seed)
    return _result("local_search", classifier, adversarial,
                   lambda lg: untargeted_success(lg, labels), started)
