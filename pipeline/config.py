"""PipelineConfig: what a run does. The absl flags of `pipeline.run` map onto it one to one."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from sdim_tf import (
    adversarial,
    conformal,
    data,
    density,
    mutual_info,
    precision,
    rejection,
    robust,
    serving,
)

MODELS = ("sdim", "discriminative")
DISTRIBUTE = ("auto", "one_device", "mirrored", "multi_worker")
LR_SCHEDULES = ("constant", "cosine")  # cosine: from learning_rate to 0 over the run
# model: the classifier's own output (log p(x|c) for SDIM, the paper's score; logits for the
# discriminative model). feature_density: tied Gaussians fitted after training on encoder
# layers (sdim_tf.density), the default after the issue-12 experiments (docs/results.md).
SCORES = ("model", "feature_density")
# per_class: the paper's percentile per class; shared: one percentile over all classes, the
# default for feature_density (it rejects more proxy outliers at the same validation reject
# rate, docs/results.md).
THRESHOLD_RULES = ("per_class", "shared")

# The paper's settings per dataset (section 5, appendix B.2): ResNet10 on MNIST and
# Fashion-MNIST, ResNet26 on CIFAR10/SVHN.
# validation_split: held-out images for the thresholds and the reject budget
# (docs/results.md); 0 for image folders, whose size is unknown.
PRESETS = {
    "mnist": {"n": 1, "validation_split": 5000, "reject_budget": 0.04},
    "fashion_mnist": {"n": 1, "validation_split": 5000, "reject_budget": 0.04},
    "cifar10": {"n": 3, "validation_split": 5000, "reject_budget": 0.04},
    "svhn_cropped": {"n": 3, "validation_split": 5000, "reject_budget": 0.04},
    "image_folder": {"n": 1, "validation_split": 0, "reject_budget": 0},
}


_ATTACK = adversarial.AttackSettings()
_LIMITS = serving.Limits()
ATTACK_COUNTS = ("attack_images", "attack_pgd_steps", "attack_deepfool_steps",
                 "attack_boundary_images", "attack_boundary_steps",
                 "attack_local_search_images", "attack_local_search_rounds",
                 "attack_cw_images", "attack_cw_steps", "attack_cw_search_steps",
                 "attack_accepted_steps", "attack_accepted_restarts", "attack_square_images",
                 "attack_square_queries", "attack_replay_images")
ATTACK_BUDGETS = ("attack_epsilons", "attack_accepted_epsilons", "attack_accepted_l2_epsilons")


# Adversarial training (sdim_tf.robust): the flags --robust_<field> of RobustTraining.
ROBUST_FIELDS = tuple("robust_" + f.name for f in dataclasses.fields(robust.RobustTraining))
LEGACY_PRECISION = {"float32": False, "bfloat16": True}
LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(serving.Limits))


class ConfigError(ValueError):
    """An invalid flag or flag combination; the message names it."""


@dataclasses.dataclass
class PipelineConfig:
    """One pipeline run. `resolve()` fills the per-dataset presets and validates."""

    dataset: str = "fashion_mnist"
    data_dir: Optional[str] = None
    run_dir: Optional[str] = None  # default runs/<dataset>-<model>
    model: str = "sdim"
    critic: str = "concat"
    mi_bound: str = "jsd"
    n: Optional[int] = None  # ResNet depth 8n+2; default from PRESETS
    rep_dim: int = 64
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    margin: float = 10.0
    log_scale_floor: Optional[float] = None
    # Not in the paper (off): a margin term on 2x2 mosaics of training images (sdim_tf.SDIM)
    outlier_weight: float = 0.0
    outlier_margin: float = 10.0
    # Not in the paper (off): adversarial training against the model's class scores
    # (sdim_tf.robust.RobustTraining; robust_epsilon 0: off)
    robust_epsilon: float = 0.0
    robust_attack: str = "pgd"
    robust_steps: int = 5
    robust_step_size: Optional[float] = None  # None: 2.5 eps / steps (pgd), 1.25 eps (fgsm)
    robust_mode: str = "classify"
    robust_weight: float = 1.0
    robust_margin: float = 10.0
    robust_clean: bool = True
    # The paper trains 500 epochs; the authors' code reaches its 95.1% on Fashion-MNIST
    # within 50 (design.md), a tenth of the cost.
    epochs: int = 50
    batch_size: int = 128
    learning_rate: float = 1e-3
    # Not the paper's constant rate: chosen on held-out data at 50 epochs (docs/results.md)
    lr_schedule: str = "cosine"
    seed: int = 0
    stages: Optional[tuple[str, ...]] = None  # None: every default stage
    train_limit: Optional[int] = None
    distribute: str = "auto"
    # auto: bfloat16 where the hardware computes it natively (sdim_tf.precision), else
    # float32; the train stage records what it chose. Exports always compute in float32.
    mixed_precision: str = "auto"
    jit_compile: str = "auto"  # XLA: on with GPUs, off on CPUs (slower there)
    deterministic: bool = False
    # Calibration (paper: 1st and 2nd percentiles on the training set). validation_split > 0
    # holds out the last N training images: never trained on, used for the thresholds.
    # Default from PRESETS.
    percentiles: tuple[float, ...] = (1, 2, 3)
    validation_split: Optional[int] = None
    score: str = "feature_density"
    density_layers: tuple[str, ...] = density.DEFAULT_LAYERS
    density_split: bool = density.DEFAULT_SPLIT  # two standardised terms per layer
    threshold_rule: Optional[str] = None  # shared for feature_density, else per_class
    export_dir: str = "saved_models"
    # What one request to the SavedModel may cost (sdim_tf.serving.Limits).
    max_image_side: int = _LIMITS.max_image_side
    max_image_bytes: int = _LIMITS.max_image_bytes
    max_request_bytes: int = _LIMITS.max_request_bytes
    max_request_pixels: int = _LIMITS.max_request_pixels
    max_batch: int = _LIMITS.max_batch
    export_percentile: float = 1  # whose thresholds the SavedModel applies, without a budget
    # > 0 (needs --validation_split): deploy split-conformal thresholds that reject at most
    # this share of images drawn like the held-out ones (0.04: the paper's Fashion-MNIST
    # rate 4.63% with room to spare), with confidence reject_confidence (0: on average).
    # 0: --export_percentile, no guarantee. Default from PRESETS.
    reject_budget: Optional[float] = None
    reject_confidence: float = 0.95
    # The evaluate stage's shift suite (sdim_tf.shifts) runs on the first N test images.
    shift_images: int = 2000
    force: bool = False
    # The opt-in attack stage (paper section 5.3); caps sized for a 2-core CPU.
    attacks: tuple[str, ...] = adversarial.ATTACKS
    attack_images: int = _ATTACK.images
    attack_epsilons: tuple[float, ...] = _ATTACK.epsilons
    attack_pgd_steps: int = _ATTACK.pgd_steps
    attack_pgd_step_size: float = _ATTACK.pgd_step_size
    attack_deepfool_steps: int = _ATTACK.deepfool_steps
    attack_boundary_images: int = _ATTACK.boundary_images
    attack_boundary_steps: int = _ATTACK.boundary_steps
    attack_local_search_images: int = _ATTACK.local_search_images
    attack_local_search_rounds: int = _ATTACK.local_search_rounds
    attack_cw_images: int = _ATTACK.cw_images
    # None: per --score (0,500,1000 for model; 0,1,2,4 x the std of the held-out images' top
    # scores for feature_density), resolved by the attack stage
    attack_cw_confidences: Optional[tuple[float, ...]] = _ATTACK.cw_confidences
    attack_cw_steps: int = _ATTACK.cw_steps
    attack_cw_search_steps: int = _ATTACK.cw_search_steps
    attack_accepted_epsilons: tuple[float, ...] = _ATTACK.accepted_epsilons
    attack_accepted_l2_epsilons: tuple[float, ...] = _ATTACK.accepted_l2_epsilons
    attack_accepted_steps: int = _ATTACK.accepted_steps
    attack_accepted_restarts: int = _ATTACK.accepted_restarts
    attack_accepted_schedule: str = _ATTACK.accepted_schedule
    attack_square_images: int = _ATTACK.square_images
    attack_square_queries: int = _ATTACK.square_queries
    attack_replay_images: int = _ATTACK.replay_images
    # run_dir of a calibrated discriminative run: its curves beside ours
    attack_baseline: Optional[str] = None

    def resolve(self, known_stages: tuple[str, ...] = ()) -> PipelineConfig:
        """Returns a copy with presets and defaults filled in; raises ConfigError."""
        try:
            data.get_spec(self.dataset)
        except data.DataError as e:
            raise ConfigError(f"--dataset: {e}") from None
        c = dataclasses.replace(self)
        for name in ("n", "validation_split", "reject_budget"):
            if getattr(c, name) is None:
                setattr(c, name, PRESETS[c.dataset][name])
        if c.run_dir is None:
            c.run_dir = os.path.join("runs", f"{c.dataset}-{c.model}")
        if c.stages is not None:
            c.stages = tuple(c.stages)
        c.attacks = tuple(c.attacks)
        if isinstance(c.mixed_precision, bool):  # the flag's meaning before "auto"
            c.mixed_precision = "bfloat16" if c.mixed_precision else "float32"
        c.density_layers = tuple(c.density_layers)
        if c.threshold_rule is None:
            c.threshold_rule = "shared" if c.score == "feature_density" else "per_class"
        for name in ATTACK_BUDGETS:
            setattr(c, name, tuple(float(e) for e in getattr(c, name)))
        if c.attack_cw_confidences is not None:
            c.attack_cw_confidences = tuple(float(k) for k in c.attack_cw_confidences)
        c.percentiles = tuple(rejection.percentile_key(p) for p in c.percentiles)
        checks = [
            (c.model in MODELS, f"--model must be one of {', '.join(MODELS)}, got {c.model!r}"),
            (c.critic in mutual_info.CRITICS,
             f"--critic must be one of {', '.join(mutual_info.CRITICS)}, got {c.critic!r}"),
            (c.mi_bound in mutual_info.BOUNDS,
             f"--mi_bound must be one of {', '.join(mutual_info.BOUNDS)}, got {c.mi_bound!r}"),
            (c.score in SCORES, f"--score must be one of {', '.join(SCORES)}, got {c.score!r}"),
            (c.threshold_rule in THRESHOLD_RULES, f"--threshold_rule must be one of "
             f"{', '.join(THRESHOLD_RULES)}, got {c.threshold_rule!r}"),
            (len(c.density_layers) > 0 and not set(c.density_layers) - set(density.LAYERS),
             f"--density_layers must be a non-empty subset of {', '.join(density.LAYERS)}, "
             f"got {list(c.density_layers)}"),
            (c.mixed_precision in precision.PRECISIONS, f"--mixed_precision must be one of "
             f"{', '.join(precision.PRECISIONS)}, got {c.mixed_precision!r}"),
            (c.jit_compile in precision.JIT_COMPILE, f"--jit_compile must be one of "
             f"{', '.join(precision.JIT_COMPILE)}, got {c.jit_compile!r}"),
            (c.distribute in DISTRIBUTE,
             f"--distribute must be one of {', '.join(DISTRIBUTE)}, got {c.distribute!r}"),
            (c.epochs >= 0, f"--epochs must be >= 0 (0: the untrained network), got "
             f"{c.epochs}"),
            (c.n >= 1, f"--n must be >= 1, got {c.n}"),
            (c.rep_dim >= 1, f"--rep_dim must be >= 1, got {c.rep_dim}"),
            (c.learning_rate > 0, f"--learning_rate must be > 0, got {c.learning_rate}"),
            (c.lr_schedule in LR_SCHEDULES, f"--lr_schedule must be one of "
             f"{', '.join(LR_SCHEDULES)}, got {c.lr_schedule!r}"),
            # SDIM's negatives pair each image with another one of its batch.
            (c.batch_size >= (2 if c.model == "sdim" else 1),
             f"--batch_size must be >= 2 for SDIM, got {c.batch_size}"),
            (c.train_limit is None or c.train_limit >= c.batch_size,
             f"--train_limit={c.train_limit} is smaller than one batch "
             f"(--batch_size={c.batch_size})"),
            (c.validation_split >= 0, f"--validation_split must be >= 0, got "
             f"{c.validation_split}"),
            (c.outlier_weight >= 0, f"--outlier_weight must be >= 0, got {c.outlier_weight}"),
            (c.outlier_weight == 0 or c.model == "sdim",
             f"--outlier_weight={c.outlier_weight:g} needs --model=sdim (the term is on its "
             f"class-conditional log-likelihoods)"),
            (all(0 <= p < 100 for p in c.percentiles) and len(c.percentiles) > 0,
             f"--percentiles must lie in [0, 100), got {list(c.percentiles)}"),
            (0 <= c.reject_budget < 1, f"--reject_budget must lie in [0, 1), got "
             f"{c.reject_budget}"),
            (0 <= c.reject_confidence < 1, f"--reject_confidence must lie in [0, 1), got "
             f"{c.reject_confidence}"),
            (not c.reject_budget or c.validation_split > 0,
             f"--reject_budget={c.reject_budget:g} promises its rate on held-out images: pass "
             f"--validation_split=N (at least "
             f"{conformal.minimum_samples(c.reject_budget, c.reject_confidence or None)} "
             f"images) or --reject_budget=0 (--export_percentile, no guarantee)"
             if 0 < c.reject_budget < 1 and 0 <= c.reject_confidence < 1 else ""),
            (c.shift_images >= 0, f"--shift_images must be >= 0, got {c.shift_images}"),
            (all(getattr(c, f) >= 1 for f in LIMIT_FIELDS),
             "--" + " --".join(f"{f}={getattr(c, f)}" for f in LIMIT_FIELDS
                               if getattr(c, f) < 1) + " must be >= 1"),
            (c.reject_budget > 0 or c.export_percentile in c.percentiles,
             f"--export_percentile={c.export_percentile} is not among --percentiles "
             f"{list(c.percentiles)}"),
            (not set(c.attacks) - set(adversarial.ATTACKS),
             f"--attacks: unknown {sorted(set(c.attacks) - set(adversarial.ATTACKS))}; "
             f"known: {', '.join(adversarial.ATTACKS)}"),
            ("pgd_accepted_linf_doubled" not in c.attacks or "pgd_accepted_linf" in c.attacks,
             "--attacks: pgd_accepted_linf_doubled checks the pgd_accepted_linf curve; "
             "select both"),
            (all(0 <= e <= 1 for e in c.attack_epsilons) and len(c.attack_epsilons) > 0,
             f"--attack_epsilons must lie in [0, 1], got {list(c.attack_epsilons)}"),
            (all(0 < e <= 1 for e in c.attack_accepted_epsilons)
             and len(c.attack_accepted_epsilons) > 0, f"--attack_accepted_epsilons must lie "
             f"in (0, 1], got {list(c.attack_accepted_epsilons)}"),
            (all(e > 0 for e in c.attack_accepted_l2_epsilons)
             and len(c.attack_accepted_l2_epsilons) > 0, f"--attack_accepted_l2_epsilons "
             f"must be > 0, got {list(c.attack_accepted_l2_epsilons)}"),
            (all(getattr(c, f) >= 1 for f in ATTACK_COUNTS),
             "--" + " --".join(f"{f}={getattr(c, f)}" for f in ATTACK_COUNTS
                               if getattr(c, f) < 1) + " must be >= 1"),
            (c.attack_pgd_step_size > 0, f"--attack_pgd_step_size must be > 0, got "
             f"{c.attack_pgd_step_size}"),
            (c.attack_accepted_schedule in adversarial.SCHEDULES,
             f"--attack_accepted_schedule must be one of {', '.join(adversarial.SCHEDULES)}, "
             f"got {c.attack_accepted_schedule!r}"),
            (all(k >= 0 for k in c.attack_cw_confidences or ()),
             f"--attack_cw_confidences must be >= 0, got {list(c.attack_cw_confidences or ())}"),
            (c.stages is None or not set(c.stages) - set(known_stages),
             f"--stages: unknown {sorted(set(c.stages or ()) - set(known_stages))}; "
             f"known: {', '.join(known_stages)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        c.robust_training()
        return c

    def robust_training(self) -> robust.RobustTraining:
        """The adversarial training the --robust_* flags ask for; raises ConfigError."""
        try:
            settings = robust.RobustTraining(**{name[len("robust_"):]: getattr(self, name)
                                                for name in ROBUST_FIELDS})
        except ValueError as e:
            raise ConfigError(f"--robust_{e}") from None
        if settings.enabled and self.model != "sdim":
            raise ConfigError(f"--robust_epsilon={settings.epsilon:g} needs --model=sdim (its "
                              f"terms are on the class-conditional log-likelihoods)")
        return settings

    def train_examples(self, num_train: int) -> tuple[int, int]:
        """(skip, limit) of the training examples the model trains on."""
        available = num_train - self.validation_split
        if available < self.batch_size:
            raise ConfigError(f"--validation_split={self.validation_split} leaves {available} "
                              f"training images, less than one batch")
        return 0, min(available, self.train_limit or available)

    def calibration_examples(self, num_train: int) -> tuple[int, int]:
        """(skip, limit): the held-out validation images, else the trained ones."""
        if self.validation_split:
            return num_train - self.validation_split, self.validation_split
        return self.train_examples(num_train)

    def limits(self) -> serving.Limits:
        return serving.Limits(**self.fields(LIMIT_FIELDS))

    def attack_settings(self) -> adversarial.AttackSettings:
        return adversarial.AttackSettings(seed=self.seed, **{
            f.name: getattr(self, "attack_" + f.name)
            for f in dataclasses.fields(adversarial.AttackSettings)
            if hasattr(self, "attack_" + f.name)})

    def fields(self, names: tuple[str, ...]) -> dict:
        """The values of `names`, for a stage's config hash. An explicit precision hashes
        as the boolean flag it replaced, and the outlier term, split density terms,
        adversarial training (and its default robust_clean) and a learning-rate schedule when
        off are left out, so runs made before any of them existed still resume."""
        values = {name: getattr(self, name) for name in names}
        if values.get("outlier_weight") == 0:  # the paper's objective: hashes as before
            values.pop("outlier_weight")
            values.pop("outlier_margin", None)
        if values.get("lr_schedule") == "constant":
            values.pop("lr_schedule")
        if values.get("robust_epsilon") == 0:
            for name in ROBUST_FIELDS:
                values.pop(name)
        elif values.get("robust_clean") is True:  # the default, left out like the others
            values.pop("robust_clean")
        if values.get("density_split") is False:
            values.pop("density_split")
        if values.get("mixed_precision") in LEGACY_PRECISION:
            values["mixed_precision"] = LEGACY_PRECISION[values["mixed_precision"]]
        return values
