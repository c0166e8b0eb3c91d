"""The attacks' names and caps."""

from __future__ import annotations

import dataclasses

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
