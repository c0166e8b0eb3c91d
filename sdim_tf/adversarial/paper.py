"""The paper's attacks (section 5.3, appendix D) through adversarial-robustness-toolbox:
FGSM and PGD-Linf accuracy curves, DeepFool, Boundary, targeted CW-L2, and LocalSearch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from sdim_tf.adversarial.classifier import require_art
from sdim_tf.adversarial.pixel_search import local_search
from sdim_tf.adversarial.results import AttackResult, targeted_success, untargeted_success
from sdim_tf.adversarial.settings import CURVE_ATTACKS, AttackSettings


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
    require_art()
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
    require_art()
    from art.attacks.evasion import DeepFool

    started = time.time()
    adversarial = DeepFool(classifier, max_iter=settings.deepfool_steps,
                           epsilon=settings.deepfool_overshoot, nb_grads=classifier.nb_classes,
                           batch_size=settings.batch_size, verbose=False).generate(images)
    return _result("deepfool", classifier, adversarial,
                   lambda lg: untargeted_success(lg, labels), started)


def boundary(classifier, images, labels, settings: AttackSettings) -> AttackResult:
    require_art()
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
    require_art()
    from art.attacks.evasion import CarliniL2Method

    started = time.time()
    adversarial = CarliniL2Method(
        classifier, confidence=confidence, targeted=True, max_iter=settings.cw_steps,
        binary_search_steps=settings.cw_search_steps, batch_size=settings.batch_size,
        verbose=False).generate(images, y=np.eye(classifier.nb_classes)[targets])
    return _result(f"cw_l2_k{confidence:g}", classifier, adversarial,
                   lambda lg: targeted_success(lg, targets, confidence), started, targets)


def local_search_attack(classifier, images, labels, settings: AttackSettings,
                        progress: Callable[[int, int], None] | None = None) -> AttackResult:
    started = time.time()
    adversarial, _ = local_search(classifier.predict, images, labels,
                                  rounds=settings.local_search_rounds, seed=settings.seed,
                                  progress=progress)
    return _result("local_search", classifier, adversarial,
                   lambda lg: untargeted_success(lg, labels), started)
