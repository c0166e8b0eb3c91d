"""The attacks' names and caps."""

from __future__ import annotations

import dataclasses

from sdim_tf.settings import setting

CURVE_ATTACKS = ("fgsm", "pgd")
UNTARGETED_ATTACKS = ("deepfool", "boundary", "local_search")
# attacks that know the rejection rule and aim at an accepted wrong class
# (pgd_accepted_linf_doubled: its curve at twice the steps and restarts, Carlini et al.'s
# convergence check; about 4x the curve's time; apgd_*: AutoPGD at the same grids and budget;
# pgd_accepted_linf_from_others: the PGD curve started from the nearest attacked image of
# another class, projected into the ball)
ADAPTIVE_ATTACKS = ("pgd_accepted_linf", "pgd_accepted_linf_doubled", "pgd_accepted_l2",
                    "apgd_accepted_linf", "apgd_accepted_l2", "pgd_accepted_linf_from_others",
                    "square_accepted", "cw_accepted")
ATTACKS = (*CURVE_ATTACKS, *UNTARGETED_ATTACKS, "cw_l2", *ADAPTIVE_ATTACKS)
SCHEDULES = ("constant", "cosine")  # of the adaptive PGD's step sizes (pgd.step_sizes)


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """Caps sized for a 2-core CPU; the paper attacks the first 1000 test images. Budgets
    (epsilons) are in the model's input space: 32x32 float images in [0, 1]."""

    images: int = setting(200, "The curves (FGSM, PGD, adaptive PGD) and DeepFool attack the "
                          "first N test images the deployed model classifies correctly and "
                          "accepts (paper: 1000).")
    epsilons: tuple[float, ...] = setting(
        (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5), "L-inf budgets of the "
        "FGSM and PGD curves in the model's input space (32x32 images in [0, 1]; paper "
        "Figures 4 and 5: 0 to 0.5).")
    pgd_steps: int = setting(10, "PGD iterations (cleverhans' default, as in the paper).")
    # cleverhans' eps_iter default
    pgd_step_size: float = setting(0.05, "PGD step, capped at each epsilon.")
    deepfool_steps: int = setting(50, "DeepFool iterations.")
    # cleverhans' overshoot, as the paper used; ART's 1e-6 leaves examples on the boundary,
    # where rounding on another CPU decides the class.
    deepfool_overshoot: float = 0.02
    boundary_images: int = setting(20, "Boundary attacks the first N attacked images.")
    boundary_steps: int = setting(1000, "Boundary attack iterations (ART's default 5000 takes "
                                  "hours per image on 2 cores).")
    local_search_images: int = setting(100, "LocalSearch attacks the first N attacked images.")
    local_search_rounds: int = setting(150, "LocalSearch rounds (Narodytska & "
                                       "Kasiviswanathan: 150).")
    cw_images: int = setting(20, "Targeted CW-L2 (and cw_accepted) attack the first N attacked "
                             "images towards every other class.")
    # None: the attack stage resolves it per score
    cw_confidences: tuple[float, ...] | None = setting(
        None, "CW-L2 confidences kappa on the scale of the attacked score; default per "
        "--score: 0,500,1000 for model (the paper's), 0,1,2,4 times the standard deviation of "
        "the held-out images' top scores for feature_density.")
    cw_steps: int = setting(10, "CW-L2 gradient steps per binary-search step.")
    cw_search_steps: int = setting(5, "CW-L2 (and cw_accepted) binary-search steps over the "
                                   "constant c.")
    # adaptive attacks (they know the rejection rule)
    accepted_epsilons: tuple[float, ...] = setting(
        (0.05, 0.1, 0.2, 0.3, 0.5, 1.0), "L-inf budgets of the adaptive curves "
        "(pgd_accepted_linf, apgd_accepted_linf, pgd_accepted_linf_from_others), "
        "square_accepted and the transfer attack; 1 "
        "(the whole image cube) is sanity check (a)'s budget.")
    accepted_l2_epsilons: tuple[float, ...] = setting(
        (0.5, 1.0, 2.0, 3.0, 4.0, 6.0), "L2 budgets of the adaptive curves pgd_accepted_l2 and "
        "apgd_accepted_l2.")
    accepted_steps: int = setting(100, "Steps of the adaptive attacks (PGD and AutoPGD per "
                                  "restart; cw_accepted per binary-search step).")
    accepted_restarts: int = setting(
        1, "Starts of the adaptive PGD and AutoPGD (the first from the image, the others at "
        "random in the ball, each on the images still without an undetected success; "
        "pgd_accepted_linf_from_others: from the nearest, second nearest, ... attacked image "
        "of another class); pgd_accepted_linf_doubled runs twice the steps and restarts.")
    # cosine: on a 10-epoch MNIST model, 400 steps found 82% at epsilon 0.1 where constant
    # steps found 70% (constant gains nothing from more steps: its path length is fixed)
    accepted_schedule: str = setting(
        "cosine", "Step sizes of the adaptive PGD: cosine (from epsilon down to 0; more steps "
        "search longer) or constant (2.5 epsilon / steps, Madry et al.).", SCHEDULES)
    # on held-out images of three robust networks, a first step of epsilon jumps into the
    # refused corners of the ball and stays there; on a standard one 1/4 finds as much
    # (docs/robust.md)
    accepted_first_step: float = setting(
        0.25, "First step of the adaptive PGD's cosine schedule (and the transfer attack's), "
        "as a fraction of epsilon.")
    square_images: int = setting(50, "square_accepted (gradient-free, a sanity check) attacks "
                                 "the first N attacked images.")
    square_queries: int = setting(1000, "Queries per image of square_accepted.")
    replay_images: int = setting(100, "Adversarial images per attack replayed against the "
                                 "exported SavedModel.")
    batch_size: int = 100
    seed: int = 0
