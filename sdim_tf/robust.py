"""Adversarial training against an attacker who knows the rejection rule.

Inside each training step, PGD-L-inf from a random start in the epsilon ball (Madry et al.)
or FGSM from a random start with step 1.25 epsilon (Wong, Rice & Kolter 2020, "fast is
better than free") perturbs the batch against a differentiable surrogate of the deployed
rule: the model's own class scores (SDIM: log p(x|c)), raising the best wrong class over
the true one (`margin_objective`). The examples are made in inference mode (moving batch-norm
statistics), as the deployed model scores, and enter the loss as constants.

They are used in one or both of two ways (`RobustTraining.mode`):
- classify: the supervised losses (J_NLL and J_LM) on them, so the ball keeps its class;
- reject: the paper's off-manifold idea made a training signal (as CCAT does for
  confidence): their best class score at least `margin` per dimension below the clean
  image's true-class score (`losses.outlier_margin_loss`), so the threshold refuses them.
J_MI stays on the clean images only: it is unsupervised and the adversarial images would
only double its cost. Under classify the adversarial examples replace the batch by default,
as in Madry et al. and Wong et al.: every loss term on them, about one pass cheaper
(`clean=True` keeps the batch beside them; reject and both always do).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from sdim_tf import losses
from sdim_tf.settings import setting

ATTACKS = ("pgd", "fgsm")
MODES = ("classify", "reject", "both")
FGSM_STEP = 1.25  # x epsilon: Wong, Rice & Kolter's step from a random start
PGD_PATH = 2.5  # x epsilon / steps: Madry et al.'s step, the path 2.5 epsilon long


@dataclasses.dataclass(frozen=True)
class RobustTraining:
    """How the training step makes and uses adversarial examples; epsilon 0: off."""

    epsilon: float = setting(
        0.0, "Adversarial training: L-inf budget of the examples each training step makes "
        "against the model's class scores (not in the paper; 0: off).")
    attack: str = setting("pgd", "pgd: PGD from a random start; fgsm: one step of 1.25 epsilon "
                          "from a random start (fast).", ATTACKS)
    steps: int = setting(3, "PGD steps of --robust_attack=pgd.")
    step_size: float | None = setting(None, "Step of the training attack; default 2.5 epsilon "
                                      "/ steps (pgd), 1.25 epsilon (fgsm).")
    mode: str = setting(
        "both", "classify: the supervised losses on the adversarial examples; reject: "
        "their best class score --robust_margin per dimension below the clean true class, so "
        "the threshold refuses them; both.", MODES)
    weight: float = setting(1.0, "Weight of the adversarial terms.")
    margin: float = setting(10.0, "Margin K per dimension of the reject term.")
    clean: bool | None = setting(
        None, "--robust_clean: keep the clean batch in the loss beside its adversarial "
        "examples; --norobust_clean: these alone in its place (Madry et al.; about one pass "
        "cheaper; --robust_mode=classify only). Default: in place under classify, beside "
        "under reject and both.")

    def __post_init__(self):
        checks = [
            (self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}"),
            (self.attack in ATTACKS, f"attack must be one of {', '.join(ATTACKS)}, "
             f"got {self.attack!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.step_size is None or self.step_size > 0,
             f"step_size must be > 0, got {self.step_size}"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.weight > 0, f"weight must be > 0, got {self.weight}"),
            (self.margin >= 0, f"margin must be >= 0, got {self.margin}"),
            (self.clean is not False or self.mode == "classify",
             f"clean=False (the adversarial examples in place of the batch) needs "
             f"mode=classify, got mode={self.mode!r}, whose reject term compares them with "
             f"the clean images"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0

    @property
    def iterations(self) -> int:
        return 1 if self.attack == "fgsm" else self.steps

    @property
    def step(self) -> float:
        if self.step_size is not None:
            return self.step_size
        if self.attack == "fgsm":
            return FGSM_STEP * self.epsilon
        return PGD_PATH * self.epsilon / self.steps

    @property
    def beside_clean(self) -> bool:
        """Whether the clean batch stays in the loss beside its adversarial examples."""
        return self.mode != "classify" if self.clean is None else self.clean

    @property
    def classifies(self) -> bool:
        return self.mode in ("classify", "both")

    @property
    def rejects(self) -> bool:
        return self.mode in ("reject", "both")

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The terms `loss_terms` adds (and the accuracy on the adversarial examples); none
        in place of the batch, where the model's own terms are theirs."""
        if not self.beside_clean:
            return ()
        return (("adv_nll_loss", "adv_lm_loss") * self.classifies
                + ("adv_reject_loss",) * self.rejects + ("adv_accuracy",))

    def to_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_settings(cls, settings: dict) -> RobustTraining:
        """From a run's flat training settings (`robust_epsilon`, ...); a run from before
        these settings existed was not trained against attacks."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in
                      ((k.removeprefix("robust_"), v) for k, v in settings.items()
                       if k.startswith("robust_")) if key in names})

    def threat_model(self) -> dict:
        """What the network was trained to withstand, in numbers and in words (the model
        card, the attack report). Training is no guarantee: the attack stage measures it."""
        measured = ("What an attacker who knows the rule achieves is measured by the attack "
                    "stage (--stages=attack), not promised.")
        if not self.enabled:
            return {"trained_against": None, "statement": (
                "Not trained against adversarial examples: an attacker who knows the rule "
                "and has the model's gradients can find small changes that it accepts in a "
                "wrong class. " + measured)}
        how = (f"PGD, {self.steps} steps of {self.step:g} from a random start"
               if self.attack == "pgd" else f"FGSM, one step of {self.step:g} from a random "
               "start")
        use = {"classify": "trained to classify them", "reject": "trained to score them "
               "below the clean images so that the threshold refuses them",
               "both": "trained to classify them and to score them below the clean images"
               }[self.mode]
        return {"trained_against": {
            "norm": "linf", "epsilon": self.epsilon, "attack": self.attack,
            "steps": self.iterations, "step_size": self.step, "mode": self.mode,
            "objective": "the best wrong class's log p(x|c) over the true class's"},
            "statement": (
                f"Trained against L-inf perturbations of at most {self.epsilon:g} in [0, 1] "
                f"pixels ({how}) that raise the best wrong class over the true one, and "
                f"{use}. Larger perturbations, other norms and attacks on the preprocessing "
                "are outside it. " + measured)}

    @classmethod
    def from_config(cls, config: dict | RobustTraining | None) -> RobustTraining:
        if isinstance(config, RobustTraining):
            return config
        return cls(**(config or {}))


def margin_objective(scores: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """[N, C], [N] -> [N]: the best wrong class's score minus the true class's, float32;
    positive where the image is misclassified."""
    scores = tf.cast(scores, tf.float32)
    true = losses.true_class(scores, labels)
    wrong = tf.where(tf.one_hot(tf.cast(labels, tf.int32), tf.shape(scores)[1]) > 0,
                     scores.dtype.min, scores)
    return tf.reduce_max(wrong, axis=1) - true


def perturb(score_fn, images: tf.Tensor, labels: tf.Tensor, epsilon: float, steps: int,
            step_size: float, start: tf.Tensor | None = None) -> tf.Tensor:
    """Signed-gradient ascent on `margin_objective` of `score_fn(x)` from `images + start`
    (default uniform in the L-inf ball), each step projected back into the ball and [0, 1].
    The gradient is taken with respect to float32 images, whatever the model computes in.
    Returns the examples as constants."""
    images = tf.cast(images, tf.float32)
    if start is None:
        start = tf.random.uniform(tf.shape(images), -epsilon, epsilon)
    x = tf.clip_by_value(images + start, 0.0, 1.0)
    for _ in range(steps):  # few steps: unrolled in the graph
        with tf.GradientTape() as tape:
            tape.watch(x)
            objective = tf.reduce_sum(margin_objective(score_fn(x), labels))
        x = x + step_size * tf.sign(tape.gradient(objective, x))
        x = tf.clip_by_value(images + tf.clip_by_value(x - images, -epsilon, epsilon), 0.0, 1.0)
    return tf.stop_gradient(x)


def adversarial_examples(settings: RobustTraining, model, images, labels) -> tf.Tensor:
    """The batch's adversarial examples against `model`'s class scores in inference mode."""
    return perturb(lambda x: model(x, training=False), images, labels, settings.epsilon,
                   settings.iterations, settings.step)


def training_inputs(settings: RobustTraining, model, images, labels) -> tuple[tf.Tensor, dict]:
    """(the images the training losses see, the extra arguments of the model's loss terms):
    the batch as it is when off; else the batch and its adversarial examples, or these
    alone in its place (`beside_clean` False)."""
    if not settings.enabled:
        return images, {}
    adversarial = adversarial_examples(settings, model, images, labels)
    if settings.beside_clean:
        return images, {"adversarial": adversarial}
    return tf.cast(adversarial, images.dtype), {}


def loss_terms(settings: RobustTraining, adversarial_per_dim_ll: tf.Tensor,
               clean_per_dim_ll: tf.Tensor, labels: tf.Tensor, lm_margin: float,
               beta: float = 1.0, gamma: float = 1.0) -> tuple[tf.Tensor, dict]:
    """(weighted sum to add to the loss, named terms) from the per-dimension log-likelihoods
    of the adversarial examples and of the clean images they were made from."""
    terms, total = {}, tf.constant(0.0)
    if settings.classifies:
        terms["adv_nll_loss"] = losses.nll_loss(adversarial_per_dim_ll, labels)
        terms["adv_lm_loss"] = losses.likelihood_margin_loss(adversarial_per_dim_ll, labels,
                                                             lm_margin)
        total += beta * terms["adv_nll_loss"] + gamma * terms["adv_lm_loss"]
    if settings.rejects:
        terms["adv_reject_loss"] = losses.outlier_margin_loss(
            adversarial_per_dim_ll, losses.true_class(clean_per_dim_ll, labels),
            settings.margin)
        total += terms["adv_reject_loss"]
    terms["adv_accuracy"] = tf.reduce_mean(tf.cast(
        margin_objective(adversarial_per_dim_ll, labels) < 0, tf.float32))
    return settings.weight * total, terms
