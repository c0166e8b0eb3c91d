"""Adversarial evaluation (paper section 5.3, appendix D) on adversarial-robustness-toolbox.

The attacks see the model's class scores: for SDIM's own score the summed class-conditional
log-likelihoods. Cross-entropy attacks (FGSM, PGD) apply softmax to them (appendix D.1);
DeepFool and CW-L2 use them as they are, so CW's confidence kappa is on the scores' scale.
Adversarial examples are "detected" when the rejection rule (equation 9) refuses them.

- `settings`: the attacks' names and `AttackSettings`.
- `results`: `AttackResult`, success and detection counts.
- `classifier`: ART's classifier over the model, batched and compiled.
- `paper`: the paper's attacks through ART (accuracy curves, DeepFool, Boundary, CW-L2,
  LocalSearch); `pixel_search`: LocalSearch itself.
- `accepted`: what the adaptive attacks aim at (an undetected success, `margin_loss`);
  `pgd`, `apgd`, `carlini`, `square`, `transfer`: the adaptive attacks; `grid`: a curve
  over budgets carried over (a success within one budget counts at every larger one);
  `worst`: the per-image worst case over attacks.
"""

from sdim_tf.adversarial.accepted import Acceptance, margin_loss, undetected_success
from sdim_tf.adversarial.apgd import apgd_accepted, apgd_accepted_curve, checkpoints
from sdim_tf.adversarial.carlini import carlini_accepted
from sdim_tf.adversarial.classifier import art_classifier
from sdim_tf.adversarial.grid import AcceptedCurve, carried_over, over_epsilons
from sdim_tf.adversarial.paper import (
    accuracy_curve,
    boundary,
    carlini_l2,
    curve_examples,
    deepfool,
    local_search_attack,
)
from sdim_tf.adversarial.pgd import pgd_accepted, pgd_accepted_curve, step_sizes
from sdim_tf.adversarial.pixel_search import local_search
from sdim_tf.adversarial.results import (
    AttackResult,
    detection_rates,
    first_correct,
    l2_distances,
    targeted_success,
    untargeted_success,
)
from sdim_tf.adversarial.settings import (
    ADAPTIVE_ATTACKS,
    ATTACKS,
    CURVE_ATTACKS,
    SCHEDULES,
    UNTARGETED_ATTACKS,
    AttackSettings,
)
from sdim_tf.adversarial.square import square_accepted, square_accepted_curve
from sdim_tf.adversarial.transfer import transfer_accepted_curve
from sdim_tf.adversarial.worst import perturbation_sizes, success_within, worst_case

__all__ = [
    "ADAPTIVE_ATTACKS", "ATTACKS", "CURVE_ATTACKS", "SCHEDULES", "UNTARGETED_ATTACKS",
    "Acceptance", "AcceptedCurve", "AttackResult", "AttackSettings", "accuracy_curve",
    "apgd_accepted", "apgd_accepted_curve", "art_classifier",
    "boundary", "carlini_accepted", "carlini_l2", "carried_over", "checkpoints",
    "curve_examples", "deepfool", "detection_rates", "first_correct", "l2_distances",
    "local_search", "local_search_attack", "margin_loss", "over_epsilons",
    "perturbation_sizes", "pgd_accepted", "pgd_accepted_curve", "square_accepted",
    "square_accepted_curve", "step_sizes", "success_within", "targeted_success",
    "transfer_accepted_curve", "undetected_success", "untargeted_success", "worst_case",
]
