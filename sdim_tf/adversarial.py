"""Adversarial evaluation (paper section 5.3, appendix D) on adversarial-robustness-toolbox.

The attacks see the model's class scores: for SDIM's own score the summed class-conditional
log-likelihoods. Cross-entropy attacks (FGSM, PGD) apply softmax to them (appendix D.1);
DeepFool and CW-L2 use them as they are, so CW's confidence kappa is on the scores' scale.
Adversarial examples are "detected" when the rejection rule (equation 9) refuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from sdim_tf import rejection

CURVE_ATTACKS = ("fgsm", "pgd")
UNTARGETED_ATTACKS = ("deepfool", "boundary", "local_search")
# attacks that know the rejection rule and aim at an accepted wrong class
# (pgd_accepted_linf_doubled: its curve at twice the steps and restarts, Carlini et al.'s
# convergence check; about 4x the curve's time)
ADAPTIVE_ATTACKS = ("pgd_accepted_linf", "pgd_accepted_linf_doubled", "pgd_accepted_l2",
                    "square_accepted", "cw_accepted")
ATTACKS = (*CURVE_ATTACKS, *UNTARGETED_ATTACKS, "cw_l2", *ADAPTIVE_ATTACKS)


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """Caps sized for a 2-core CPU; the paper attacks the first 1000 test images. Budgets
    (epsilons) are in the model's input space: 32x32 float images in [0, 1]."""

    images: int = 200  # attacked images of the curves and DeepFool
    epsilons: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    pgd_steps: int = 10  # cleverhans' default, as the paper used
    pgd_step_size: float = 0.05  # cleverhans' eps_iter default (capped at epsilon)
    deepfool_steps: int = 50
    # cleverhans' overshoot, as the paper used; ART's 1e-6 leaves examples on the boundary,
    # where rounding on another CPU decides the class.
    deepfool_overshoot: float = 0.02
    boundary_images: int = 20
    boundary_steps: int = 1000  # ART's default 5000 takes about 10 min per image here
    local_search_images: int = 100
    local_search_rounds: int = 150  # Narodytska & Kasiviswanathan's
    cw_images: int = 20  # each attacked towards all other classes, for every confidence
    # None: per score (the stage resolves it); else kappa on the attacked score's scale
    cw_confidences: tuple[float, ...] | None = None
    cw_steps: int = 10
    cw_search_steps: int = 5
    # adaptive attacks (they know the rejection rule)
    accepted_epsilons: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)  # PGD-Linf
    accepted_l2_epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
    accepted_steps: int = 100
    accepted_restarts: int = 1
    # cosine: on a 10-epoch MNIST model, 400 steps found 82% at epsilon 0.1 where constant
    # steps found 70% (constant gains nothing from more steps: its path length is fixed)
    accepted_schedule: str = "cosine"
    square_images: int = 50
    square_queries: int = 1000
    replay_images: int = 100  # per adversarial set, replayed against the SavedModel
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
        return l2_distances(self.adversarial, images)


def l2_distances(adversarial: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per image, the L2 norm of the perturbation [N]."""
    return np.sqrt(((adversarial - images) ** 2).reshape(len(images), -1).sum(1))


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


def curve_examples(classifier, images: np.ndarray, attack: str,
                   settings: AttackSettings) -> Iterator[np.ndarray]:
    """FGSM or randomised PGD-Linf examples of `images` for each epsilon (the images
    themselves at 0); both aim at the predicted class, as in Figures 4 and 5."""
    _require_art()
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    if attack not in CURVE_ATTACKS:
        raise ValueError(f"accuracy curves are for {CURVE_ATTACKS}, got {attack!r}")
    for eps in settings.epsilons:
        if eps == 0:
            yield images
        elif attack == "fgsm":
            yield FastGradientMethod(classifier, norm=np.inf, eps=eps,
                                     batch_size=settings.batch_size).generate(images)
        else:
            _with_seed(settings.seed)
            yield ProjectedGradientDescent(
                classifier, norm=np.inf, eps=eps, eps_step=min(settings.pgd_step_size, eps),
                max_iter=settings.pgd_steps, num_random_init=1, batch_size=settings.batch_size,
                verbose=False).generate(images)


def accuracy_curve(classifier, images: np.ndarray, labels: np.ndarray, attack: str,
                   settings: AttackSettings) -> list[float]:
    """Accuracy under FGSM or randomised PGD-Linf for each epsilon (Figures 4 and 5)."""
    return [float((classifier.predict(x).argmax(1) == labels).mean())
            for x in curve_examples(classifier, images, attack, settings)]


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
                 progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """LocalSearch (Narodytska & Kasiviswanathan 2016, Algorithm 3), untargeted, black-box.

    Each round scores candidate pixels by how much setting them to p * sign(pixel) (in the
    [-1/2, 1/2]-centred scale) lowers the true class, multiplies the t best by r with cyclic
    wrap-around in bounds, stops when the true class leaves the top k, and takes the next
    candidates from the (2d+1)^2 neighbourhoods of the perturbed pixels. The score is the
    log-softmax of the true class: the paper's probability, without float ties at 1.0.
    As in Foolbox, each round scores a random subset of at most `max_candidates` pixels.
    `predict` maps images [B, H, W, C] to logits [B, classes]. `progress(round, unfooled)`,
    if given, is called after every round. Returns (adversarial, success); a failed image
    comes back unchanged.
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
    for done in range(1, rounds + 1):
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
        if progress is not None:
            progress(done, len(active))
    return adversarial, success


def local_search_attack(classifier, images, labels, settings: AttackSettings,
                        progress: Callable[[int, int], None] | None = None) -> AttackResult:
    started = time.time()
    adversarial, _ = local_search(classifier.predict, images, labels,
                                  rounds=settings.local_search_rounds, seed=settings.seed,
                                  progress=progress)
    return _result("local_search", classifier, adversarial,
                   lambda lg: untargeted_success(lg, labels), started)


# Adaptive attacks: they know the rejection rule (equation 9) and succeed only with an
# "undetected" adversarial example, wrong (or the target) and accepted.

def _scores(scorer, images):
    return tf.cast(scorer(images), tf.float32)  # bfloat16 scores would round the margins


def _reached(scores, labels, targets, thresholds):
    """Equation 9 accepts the answer and it is the target (targets >= 0) or else wrong."""
    decision = rejection.decide(scores, thresholds)
    predicted = tf.cast(decision.class_ids, tf.int32)
    labels, targets = tf.cast(labels, tf.int32), tf.cast(targets, tf.int32)
    hit = tf.where(targets >= 0, predicted == targets, predicted != labels)
    return hit & tf.logical_not(decision.rejected)


def undetected_success(scores, labels, thresholds) -> np.ndarray:
    """Misclassified and accepted by the deployed rule (`rejection.decide`), bool [N]."""
    labels = np.asarray(labels)
    return _reached(scores, labels, np.full(len(labels), -1), thresholds).numpy()


def margin_loss(scores, labels, targets, thresholds, margin=0.0):
    """Per image relu(t_k - s_k + margin) + relu(max_{j != k} s_j - s_k + margin): zero once
    class k clears its threshold and leads every other class by `margin`. k is the target, or
    where targets < 0 the wrong class closest to an undetected success."""
    scores = tf.cast(scores, tf.float32)
    top = tf.math.top_k(scores, 2).values
    rivals = tf.where(scores == top[:, :1], top[:, 1:], top[:, :1])  # best other class
    over_threshold, ahead = scores - tf.cast(thresholds, tf.float32), scores - rivals
    closeness = tf.where(tf.one_hot(labels, tf.shape(scores)[1]) > 0, -np.inf,
                         tf.minimum(over_threshold, ahead))
    k = tf.where(targets >= 0, targets, tf.argmax(closeness, 1, output_type=tf.int32))
    short = -tf.stack([over_threshold, ahead], 2) + margin  # [N, C, 2]
    return tf.reduce_sum(tf.nn.relu(tf.gather(short, k, axis=1, batch_dims=1)), 1)


def _specs(image_shape):
    return (tf.TensorSpec([None, *image_shape], tf.float32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.float32))


def _evaluator(scorer, image_shape):
    """Compiled: images, labels, targets, thresholds -> (scores, margin loss, success)."""
    images, ints, floats, _ = _specs(image_shape)

    @tf.function(input_signature=[images, ints, ints, floats], reduce_retracing=True)
    def evaluate(x, labels, targets, thresholds):
        scores = _scores(scorer, x)
        return (scores, margin_loss(scores, labels, targets, thresholds),
                _reached(scores, labels, targets, thresholds))

    def batched(x, labels, targets, thresholds, batch_size):
        parts = [evaluate(x[i:i + batch_size], labels[i:i + batch_size],
                          targets[i:i + batch_size], thresholds)
                 for i in range(0, max(len(x), 1), batch_size)]  # one empty batch for none
        return tuple(np.concatenate([p[j].numpy() for p in parts]) for j in range(3))

    return batched


def _attack_inputs(images, labels, targets, thresholds):
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    targets = np.full(len(images), -1, np.int32) if targets is None \
        else np.asarray(targets, np.int32)
    return images, labels, targets, tf.constant(np.asarray(thresholds), tf.float32)


def _accepted_result(name, evaluate, adversarial, labels, targets, thresholds, batch_size,
                     started) -> AttackResult:
    """Scores from a separate forward pass on the returned images; success re-checked on them
    by the deployed rule."""
    scores, _, _ = evaluate(adversarial, labels, targets, thresholds, batch_size)
    success = _reached(scores, labels, targets, thresholds).numpy()
    return AttackResult(name, adversarial, scores, success, time.time() - started,
                        None if (targets < 0).all() else targets)


def _per_image_l2(t):
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=[1, 2, 3], keepdims=True))


def _pgd_program(scorer, norm: str, image_shape):
    if norm not in ("inf", "2"):
        raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")
    images, ints, floats, scalar = _specs(image_shape)

    def direction(descent):  # steepest descent under the norm
        if norm == "inf":
            return tf.sign(descent)
        return descent / tf.maximum(_per_image_l2(descent), 1e-12)

    def project(delta, epsilon):
        if norm == "inf":
            return tf.clip_by_value(delta, -epsilon, epsilon)
        return delta * tf.minimum(1.0, epsilon / tf.maximum(_per_image_l2(delta), 1e-12))

    # One compiled step, the loop in Python, so that images that succeed leave the batch
    # (1.15-1.3x faster than the whole loop compiled, on a 10-epoch MNIST model).
    @tf.function(input_signature=[images, images, ints, ints, floats, scalar, scalar, scalar],
                 reduce_retracing=True)
    def step(clean, x, labels, targets, thresholds, epsilon, step_size, margin):
        """(margin loss at x, whether x is an undetected success, the next iterate)."""
        with tf.GradientTape() as tape:
            tape.watch(x)
            scores = _scores(scorer, x)
            loss = margin_loss(scores, labels, targets, thresholds, margin)
        moved = x + step_size * direction(-tape.gradient(loss, x))
        return (loss, _reached(scores, labels, targets, thresholds),
                tf.clip_by_value(clean + project(moved - clean, epsilon), 0.0, 1.0))

    def attack(clean, x, labels, targets, thresholds, epsilon, step_sizes, margin):
        """From `x`, one step per entry of `step_sizes` (the last evaluates only): the first
        undetected success, else the iterate of the lowest loss."""
        best, best_loss = x.copy(), np.full(len(x), np.inf, np.float32)
        found, active = np.zeros(len(x), bool), np.arange(len(x))
        for step_size in step_sizes:
            loss, hit, following = (t.numpy() for t in step(
                clean[active], x, labels[active], targets[active], thresholds, epsilon,
                step_size, margin))
            keep = hit | (loss < best_loss[active])
            best[active[keep]], best_loss[active[keep]] = x[keep], loss[keep]
            found[active] = hit
            x, active = following[~hit], active[~hit]
            if not len(active):
                break
        return best, best_loss, found

    return attack


def _random_starts(rng, images, epsilon, norm):
    """Uniform in the epsilon ball (then clipped to [0, 1])."""
    if norm == "inf":
        delta = rng.uniform(-epsilon, epsilon, images.shape)
    else:
        delta = rng.standard_normal(images.shape)
        flat = delta.reshape(len(images), -1)
        radius = epsilon * rng.uniform(0, 1, len(images)) ** (1 / flat.shape[1])
        delta *= (radius / np.linalg.norm(flat, axis=1))[:, None, None, None]
    return np.clip(images + delta, 0, 1).astype(np.float32)


SCHEDULES = ("constant", "cosine")


def step_sizes(epsilon: float, steps: int, schedule: str = "cosine",
               step_size: float | None = None) -> np.ndarray:
    """[steps + 1] PGD step sizes. constant: `step_size`, by default 2.5 * epsilon / steps
    (Madry et al.; the path length stays 2.5 epsilon whatever the steps). cosine: from
    `step_size`, by default epsilon, down to 0 along half a cosine, so that more steps
    search longer and end finer."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return np.full(steps + 1, 2.5 * epsilon / steps if step_size is None else step_size)
    first = epsilon if step_size is None else step_size
    return first * 0.5 * (1 + np.cos(np.pi * np.arange(steps + 1) / steps))


def _pgd(scorer, images, labels, thresholds, epsilons, *, norm, steps, step_size=None,
         schedule="cosine", restarts=1, margin=0.0, targets=None, batch_size=100, seed=0,
         after=None):
    """pgd_accepted's result for each epsilon, the compiled step traced once for all. Over a
    growing grid the first start at each epsilon is the previous epsilon's result (inside the
    larger ball), so an image's success at one epsilon holds at every larger one. Each start
    attacks only the images without a success yet (a success is kept as found), which saves
    most of the work at large epsilons and changes no image's result. `after`: (epsilon,
    result) of the grid point before the first, when a curve resumes."""
    images, labels, targets, thresholds = _attack_inputs(images, labels, targets, thresholds)
    attack = _pgd_program(scorer, norm, images.shape[1:])
    evaluate = _evaluator(scorer, images.shape[1:])
    previous, previous_epsilon = images, -np.inf
    previous_found = np.zeros(len(images), bool)
    if after is not None:
        previous_epsilon, previous, previous_found = after[0], after[1].adversarial, \
            after[1].success
    for epsilon in epsilons:
        started, rng = time.time(), np.random.default_rng(seed)
        sizes = step_sizes(epsilon, steps, schedule, step_size)
        best, best_loss = images.copy(), np.full(len(images), np.inf, np.float32)
        found = np.zeros(len(images), bool)
        if epsilon >= previous_epsilon:  # the previous successes lie inside this ball
            first, found[:] = previous, previous_found
            best[found], best_loss[found] = previous[found], 0.0
        else:
            first = images
        for restart in range(restarts):
            # drawn for every image, so an image's start does not depend on the others
            starts = first if restart == 0 else _random_starts(rng, images, epsilon, norm)
            left = np.flatnonzero(~found)
            for i in range(0, len(left), batch_size):
                part = left[i:i + batch_size]
                x, loss, hit = attack(images[part], starts[part], labels[part], targets[part],
                                      thresholds, epsilon, sizes, margin)
                keep = hit | (loss < best_loss[part])
                best[part[keep]], best_loss[part[keep]] = x[keep], loss[keep]
                found[part] |= hit
        result = _accepted_result(f"pgd_accepted_l{norm}", evaluate, best, labels, targets,
                                  thresholds, batch_size, started)
        # the re-checked successes carry on, so the reported curve never falls
        previous, previous_epsilon, previous_found = best, epsilon, result.success
        yield result


def pgd_accepted(scorer, images, labels, thresholds, *, norm: str, epsilon: float,
                 steps: int, step_size: float | None = None, schedule: str = "cosine",
                 restarts: int = 1, margin: float = 0.0, targets=None, batch_size: int = 100,
                 seed: int = 0) -> AttackResult:
    """PGD (L-inf or L2, `norm` "inf" or "2") on `margin_loss` inside the epsilon ball and
    [0, 1]: per image the first undetected success (of its target, given `targets`), else
    the iterate of the lowest loss. Restarts after the first start at random in the ball.
    Step sizes: `step_sizes` of the `schedule`."""
    return next(_pgd(scorer, images, labels, thresholds, (epsilon,), norm=norm, steps=steps,
                     step_size=step_size, schedule=schedule, restarts=restarts,
                     margin=margin, targets=targets, batch_size=batch_size, seed=seed))


@dataclasses.dataclass(frozen=True)
class AcceptedCurve:
    """Undetected successes of `pgd_accepted` over a grid of epsilons."""

    epsilons: tuple[float, ...]
    success: np.ndarray  # bool [len(epsilons), N], undetected successes
    adversarial: np.ndarray | None = None  # [len(epsilons), N, ...], the returned images
    scores: np.ndarray | None = None  # [len(epsilons), N, C], their class scores
    seconds: float = 0.0

    @property
    def shares(self) -> list[float]:
        return [float(s.mean()) for s in self.success]

    def smallest_epsilon(self) -> np.ndarray:
        """Per image the smallest epsilon of the grid at which the attack succeeded (inf if
        never): its perturbation size, for the median."""
        grid = np.where(self.success, np.asarray(self.epsilons, float)[:, None], np.inf)
        return grid.min(0)


def pgd_accepted_curve(scorer, images, labels, thresholds, *, epsilons, norm: str,
                       steps: int, done: Sequence[AttackResult] = (),
                       on_result: Callable[[int, AttackResult], None] | None = None,
                       **options) -> AcceptedCurve:
    """`pgd_accepted` (same `options`) for each epsilon; along a growing grid each epsilon
    starts from the last one's result (see `_pgd`). `on_result(i, result)` hears of each
    epsilon as it finishes; given those results of the first epsilons as `done`, a curve
    that was stopped goes on where it stopped, with the same result as if it had not."""
    epsilons, results = tuple(epsilons), list(done)
    after = (epsilons[len(done) - 1], done[-1]) if done else None
    for result in _pgd(scorer, images, labels, thresholds, epsilons[len(done):], norm=norm,
                       steps=steps, after=after, **options):
        if on_result is not None:
            on_result(len(results), result)
        results.append(result)
    return AcceptedCurve(tuple(epsilons), np.stack([r.success for r in results]),
                         np.stack([r.adversarial for r in results]),
                         np.stack([r.logits for r in results]),
                         sum(r.seconds for r in results))


def _carlini_program(scorer, image_shape):
    images, ints, floats, scalar = _specs(image_shape)

    # compiled step, loop in Python (see _pgd_program)
    @tf.function(input_signature=[images, images, images, images, ints, floats, floats, scalar,
                                  scalar, scalar], reduce_retracing=True)
    def step(clean, w, m, v, targets, thresholds, const, t, learning_rate, confidence):
        """At w: (x, its squared L2 distance, whether it is an undetected success of the
        target); then one Adam step: (w, m, v)."""
        with tf.GradientTape() as tape:
            tape.watch(w)
            x = (tf.tanh(w) + 1) / 2
            scores = _scores(scorer, x)
            l2 = tf.reduce_sum(tf.square(x - clean), [1, 2, 3])
            # the targets stand in for the labels, which a targeted loss does not use
            loss = l2 + const * margin_loss(scores, targets, targets, thresholds, confidence)
        g = tape.gradient(loss, w)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * tf.square(g)
        w -= learning_rate * m / (1 - 0.9 ** t) / (tf.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        return x, l2, _reached(scores, targets, targets, thresholds), w, m, v

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
    images, targets, _, thresholds = _attack_inputs(images, targets, None, thresholds)
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
    return _accepted_result(f"cw_accepted_k{confidence:g}", _evaluator(scorer, images.shape[1:]),
                            best, targets, targets, thresholds, batch_size, started)


# after these many of 10,000 queries the window's share of the image halves (the paper's)
_SQUARE_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_accepted(scorer, images, labels, thresholds, *, epsilon: float,
                    queries: int = 1000, p_init: float = 0.05, seed: int = 0,
                    batch_size: int = 100) -> AttackResult:
    """Square Attack, L-inf (Andriushchenko et al. 2020), on the untargeted `margin_loss`:
    gradient-free, so it checks that the gradient attacks are not masked. From vertical
    stripes of +-epsilon, each query sets a random square window to +-epsilon per channel
    and keeps it only where the loss falls; the window's area share p_init halves on the
    paper's schedule. At most `queries` forward passes per image."""
    started, rng = time.time(), np.random.default_rng(seed)
    images, labels, targets, thresholds = _attack_inputs(images, labels, None, thresholds)
    evaluate = _evaluator(scorer, images.shape[1:])
    n, h, w, channels = images.shape
    stripes = rng.choice([-epsilon, epsilon], (n, 1, w, channels))
    x = np.clip(images + stripes, 0, 1).astype(np.float32)
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
        delta = np.where(window, signs, x[active] - images[active])
        candidate = np.clip(images[active] + delta, 0, 1).astype(np.float32)
        _, new_loss, hit = evaluate(candidate, labels[active], targets[active], thresholds,
                                    batch_size)
        keep = hit | (new_loss < loss[active])
        x[active[keep]], loss[active[keep]] = candidate[keep], new_loss[keep]
        found[active[keep]] = hit[keep]
    return _accepted_result("square_accepted", evaluate, x, labels, targets,
                            thresholds, batch_size, started)
