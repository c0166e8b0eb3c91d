"""What a run does: one dataclass per concern; each stage receives only its own sections.

A field's help is its flag's: `pipeline.run` makes the absl flags from the fields (names are
unique across sections, pipeline.sections), and `PipelineConfig.from_flat(dataset="mnist",
epochs=2)` takes the same names.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from absl import flags

from pipeline import sections, selection
from pipeline.sections import ConfigError, Section, check, derived, library, option
from sdim_tf import (
    adversarial,
    conformal,
    data,
    density,
    mutual_info,
    precision,
    rejection,
    robust,
    rules,
    scores,
    serving,
)

MODELS = ("sdim", "discriminative")
DISTRIBUTE = ("auto", "one_device", "mirrored", "multi_worker")
LR_SCHEDULES = ("constant", "cosine")
SCORES = scores.SCORES.names()
THRESHOLD_RULES = rules.GROUPINGS
UNFAMILIAR_RULES, AMBIGUITY_RULES = (rules.names(r) for r in (rejection.UNFAMILIAR,
                                                              rejection.AMBIGUOUS))
# The calibrate flag that sets a score's or rule's setting when the flag is not named after
# the setting (the rules' by kind of refusal); the other settings keep their defaults.
SCORE_FLAGS = {"layers": "density_layers", "split": "density_split"}
RULE_FLAGS = {rejection.UNFAMILIAR: {"alpha": "reject_budget", "confidence": "reject_confidence",
                                     "grouping": "threshold_rule",
                                     "percentile": "export_percentile"},
              rejection.AMBIGUOUS: {"confidence": "max_error_confidence"}}
# The paper's ResNet10 on MNIST and Fashion-MNIST, ResNet26 on CIFAR10/SVHN (section 5),
# calibrated on the last 5000 training images, with both promises. Image folders, of unknown
# size and in class order, hold out a share of each class instead; the budget's promise is the
# strongest their held-out images support (calibrate: conformal.attainable). The error
# promise is off for them: a 2% promise needs a few hundred correctly answered held-out
# images in its half (`rules.ambiguous.minimum_samples`), more than most folders hold out.
PRESETS = {name: {"n": n, "validation_split": 5000, "validation_fraction": 0.0,
                  "reject_budget": 0.04, "max_error": 0.02} for name, n in (
    ("mnist", 1), ("fashion_mnist", 1), ("cifar10", 3), ("svhn_cropped", 3))}
PRESETS["image_folder"] = {"n": 1, "validation_split": 0, "validation_fraction": 0.2,
                           "reject_budget": 0.04, "max_error": 0}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    dataset: str = option("fashion_mnist", f"Dataset: {', '.join(data.DATASETS)}.")
    data_dir: Optional[str] = option(None, "Folder holding <dataset>/train-images-idx3-ubyte.gz "
                                     "etc. (or <dataset>/train/<class>/ images); default: "
                                     "$SDIM_DATA_DIR, then tfds.")
    folder: data.FolderOptions = library(data.FolderOptions)

    def validate(self) -> None:
        try:
            data.get_spec(self.dataset)
        except data.DataError as e:
            raise ConfigError(f"--dataset: {e}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    model: str = option("sdim", "SDIM or its discriminative counterpart.", MODELS)
    critic: str = option("concat", "Local-MI critic: concat (the paper's, 4x4 map) or dot (the "
                         "authors' code's, 16x16 map).", tuple(mutual_info.CRITICS))
    mi_bound: str = option("jsd", "MI lower bound.", mutual_info.BOUNDS)
    n: Optional[int] = option(None, "ResNet depth 8n+2; default per dataset (1, or 3 for "
                              "CIFAR10/SVHN).")
    rep_dim: int = option(64, "Representation size d.")
    alpha: float = option(1.0, "Weight of the MI loss.")
    beta: float = option(1.0, "Weight of the NLL loss.")
    gamma: float = option(1.0, "Weight of the likelihood-margin loss.")
    margin: float = option(10.0, "Margin K per dimension of the likelihood-margin loss.")
    log_scale_floor: Optional[float] = option(None, "Floor on the class log-scales (off by "
                                              "default).")
    outlier_weight: float = option(0.0, "Weight of the outlier-margin term on 2x2 mosaics of "
                                   "training images (not in the paper; 0: off).")
    outlier_margin: float = option(10.0, "Margin K per dimension of the outlier-margin term, "
                                   "below the true class of the mosaic's first image.")
    robust: robust.RobustTraining = library(robust.RobustTraining, prefix="robust_")

    # A run without adversarial training is keyed by these fixed values of the flags it
    # ignores, so its cache key and resume hash stay whatever their defaults are.
    ROBUST_OFF_KEY = {"robust_attack": "pgd", "robust_steps": 5, "robust_step_size": None,
                      "robust_mode": "classify", "robust_weight": 1.0, "robust_margin": 10.0,
                      "robust_clean": True}

    def flat(self, keyed_only: bool = False) -> dict:
        values = super().flat(keyed_only)
        if keyed_only and not self.robust.enabled:
            values.update(self.ROBUST_OFF_KEY)
        return values

    def checks(self) -> list:
        return [(self.n >= 1, f"--n must be >= 1, got {self.n}"),
                (self.rep_dim >= 1, f"--rep_dim must be >= 1, got {self.rep_dim}"),
                (self.outlier_weight >= 0,
                 f"--outlier_weight must be >= 0, got {self.outlier_weight}"),
                (self.outlier_weight == 0 or self.model == "sdim",
                 f"--outlier_weight={self.outlier_weight:g} needs --model=sdim (the term is on "
                 "its class-conditional log-likelihoods)"),
                (not self.robust.enabled or self.model == "sdim",
                 f"--robust_epsilon={self.robust.epsilon:g} needs --model=sdim (its terms are on "
                 "the class-conditional log-likelihoods)")]


@dataclasses.dataclass(frozen=True)
class Watch:
    """The deployed-style rejection the train stage watches each epoch (calibrate's flags)."""

    budget: float = 0.04
    confidence: Optional[float] = 0.95
    layers: tuple[str, ...] = density.DEFAULT_LAYERS
    split: bool = density.DEFAULT_SPLIT


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    epochs: int = option(50, "Training epochs (paper: 500; 50 reach its accuracy; 0: the "
                         "untrained network, a baseline).")
    batch_size: int = option(128, "Global batch size.")
    learning_rate: float = option(1e-3, "Adam learning rate.")
    lr_schedule: str = option("cosine", "cosine: decays the learning rate to 0 over --epochs "
                              "(so a finished run cannot be extended; chosen on held-out data, "
                              "docs/results.md); constant: the paper's.", LR_SCHEDULES)
    seed: int = option(0, "Random seed (weights, shuffling, augmentation; the later stages' "
                       "outliers, maps and attacks).")
    train_limit: Optional[int] = option(None, "Train on N of the training examples (smoke "
                                        "runs): the first N, or N drawn with --seed under "
                                        "--validation_fraction.")
    validation_split: Optional[int] = option(
        None, "Hold out the last N training images for calibration; default per dataset "
        "(5000; 0 for image_folder). 0: calibrate on the training images, as the paper, "
        "unless --validation_fraction.")
    validation_fraction: Optional[float] = option(
        None, "Hold out this share of each class's training images for calibration (at "
        f"least {selection.HELD_OUT_MIN} per class, drawn with --seed) instead of the last N; "
        "default per dataset (0.2 for image_folder, whose images come in class order; else 0).")
    distribute: str = option("auto", "auto: MirroredStrategy on >1 GPU, "
                             "MultiWorkerMirroredStrategy when TF_CONFIG names several workers, "
                             "else the default strategy.", DISTRIBUTE, key=False)
    mixed_precision: str = option(
        "auto", "Training compute dtype: auto = where the hardware has bf16 natively (CPU "
        "avx512_bf16/amx_bf16, GPU compute capability >= 8.0), the faster of float32 and "
        "bfloat16 as timed on a few steps of this run's model (cached per machine in "
        "$SDIM_CACHE_DIR, else $XDG_CACHE_HOME/sdim_tf or ~/.cache/sdim_tf), else float32 "
        "(losses stay float32; exports always compute in float32).", precision.PRECISIONS)
    jit_compile: str = option("auto", "XLA for the training step: auto = on with GPUs, off on "
                              "CPUs.", precision.JIT_COMPILE, key=False)
    deterministic: bool = option(False, "Deterministic TF ops (slower).")
    watch: Watch = derived(Watch, "The rejection watched each epoch (history.csv monitor/*).")
    fresh: bool = derived(bool, "--force: start afresh instead of resuming.")

    def checks(self) -> list:
        return [(self.epochs >= 0,
                 f"--epochs must be >= 0 (0: the untrained network), got {self.epochs}"),
                (self.learning_rate > 0,
                 f"--learning_rate must be > 0, got {self.learning_rate}"),
                (self.train_limit is None or self.train_limit >= 2,
                 f"--train_limit must be >= 2, got {self.train_limit}"),
                (self.validation_split >= 0,
                 f"--validation_split must be >= 0, got {self.validation_split}"),
                (0 <= self.validation_fraction < 1,
                 f"--validation_fraction must lie in [0, 1), got {self.validation_fraction}"),
                (not (self.validation_split and self.validation_fraction),
                 f"--validation_split={self.validation_split} and --validation_fraction="
                 f"{self.validation_fraction:g} both hold images out; set one to 0")]

    @property
    def holds_out(self) -> bool:
        return bool(self.validation_split or self.validation_fraction)

    def batch(self, num_trained: int) -> int:
        """The global batch: --batch_size, or all the images when there are fewer."""
        return min(self.batch_size, num_trained)


@dataclasses.dataclass(frozen=True)
class CalibrateConfig(Section):
    score: str = option("feature_density", "Rejection score (sdim_tf.scores): the model's own "
                        "output (SDIM: log p(x|c), the paper's) or feature_density (tied "
                        "Gaussians on encoder layers, fitted after training; see "
                        "docs/results.md).", SCORES)
    density_layers: tuple[str, ...] = option(
        density.DEFAULT_LAYERS, f"Encoder layers of --score=feature_density, among "
        f"{', '.join(density.LAYERS)}.")
    density_split: bool = option(density.DEFAULT_SPLIT, "--score=feature_density: score each "
                                 "layer as two standardised terms, within the span of the class "
                                 "means and outside it (sdim_tf.density), instead of one.")
    unfamiliar_rule: Optional[str] = option(
        None, "The deployed thresholds on the score (sdim_tf.rules): conformal (at most "
        "--reject_budget of new images refused) or percentile (--export_percentile, no "
        "promise); default conformal when --reject_budget > 0, else percentile.",
        UNFAMILIAR_RULES)
    threshold_rule: Optional[str] = option(
        None, "Thresholds per class (the paper's) or one shared by all classes; default shared "
        "for --score=feature_density, else per_class.", THRESHOLD_RULES)
    percentiles: tuple[float, ...] = option((1, 2, 3), "Threshold percentiles of the "
                                            "calibration scores (paper: 1,2).")
    reject_budget: Optional[float] = option(
        None, "Deploy thresholds that reject at most this share of new images drawn like the "
        "held-out ones (split conformal; needs --validation_split); default 0.04, 0 for "
        "image_folder. 0: use --export_percentile, no guarantee.")
    reject_confidence: float = option(0.95, "Confidence of the --reject_budget guarantee over "
                                      "the draw of the held-out images (0: on average only).")
    export_percentile: float = option(1, "The calibrated percentile whose thresholds the "
                                      "SavedModel applies under --unfamiliar_rule=percentile.")
    max_error: Optional[float] = option(
        None, "Also refuse, as ambiguous, the answers whose gap between the two best class "
        "scores is below a threshold chosen so that at most this share of the accepted answers "
        "are wrong (selective classification with guaranteed risk; needs held-out images: half "
        "of them choose each threshold); default 0.02, 0 (off) for image_folder. The default "
        "is left out, with a warning, where the held-out images cannot support it; a value "
        "given here stops the run instead.")
    max_error_confidence: float = option(0.95, "Confidence of the --max_error promise over the "
                                         "draw of the held-out images.")
    ambiguity_rule: str = option("ambiguous", "The rule of the second refusal under "
                                 "--max_error (sdim_tf.rules).", AMBIGUITY_RULES)
    max_error_required: bool = derived(bool, "--max_error was given: held-out images that "
                                       "cannot support it stop the run (the preset's is left "
                                       "out instead).")

    def checks(self) -> list:
        return [(len(self.density_layers) > 0 and not set(self.density_layers) - set(
                    density.LAYERS), f"--density_layers must be a non-empty subset of "
                 f"{', '.join(density.LAYERS)}, got {list(self.density_layers)}"),
                (all(0 <= p < 100 for p in self.percentiles) and len(self.percentiles) > 0,
                 f"--percentiles must lie in [0, 100), got {list(self.percentiles)}"),
                (0 <= self.reject_budget < 1,
                 f"--reject_budget must lie in [0, 1), got {self.reject_budget}"),
                (0 <= self.reject_confidence < 1,
                 f"--reject_confidence must lie in [0, 1), got {self.reject_confidence}"),
                (self.unfamiliar_rule != "conformal" or self.reject_budget > 0,
                 "--unfamiliar_rule=conformal needs --reject_budget > 0"),
                (self.unfamiliar_rule != "percentile"
                 or self.export_percentile in self.percentiles,
                 f"--export_percentile={self.export_percentile:g} is not among --percentiles "
                 f"{list(self.percentiles)}"),
                (0 <= self.max_error < 1, f"--max_error must lie in [0, 1), got "
                 f"{self.max_error}"),
                (0 < self.max_error_confidence < 1, f"--max_error_confidence must lie in "
                 f"(0, 1), got {self.max_error_confidence}"),
                self._built()]

    def _built(self) -> tuple[bool, str]:
        """The check that the score and rules accept their settings from the flags."""
        try:
            self.scoring(), self.refusal_rules()
        except ValueError as e:
            return False, f"--score={self.score}, --unfamiliar_rule={self.unfamiliar_rule}: {e}"
        return True, ""

    def scoring(self) -> scores.Score:
        """The --score, with its settings from the flags."""
        return _build(scores.get(self.score), SCORE_FLAGS, self.flat())

    def refusal_rules(self) -> tuple[rules.Rule, rules.Rule | None]:
        """(the unfamiliar rule, the ambiguity rule or None without --max_error), with their
        settings from the flags."""
        values = {**self.flat(), "reject_confidence": self.reject_confidence or None}
        unfamiliar = _build(rules.get(self.unfamiliar_rule), RULE_FLAGS[rejection.UNFAMILIAR],
                            values)
        ambiguity = _build(rules.get(self.ambiguity_rule), RULE_FLAGS[rejection.AMBIGUOUS],
                           values) if self.max_error else None
        return unfamiliar, ambiguity


def _build(cls, flag_names: dict, values: dict):
    """`cls` with each of its settings read from the flag `flag_names` gives for it, else from
    the flag of its own name, if any."""
    settings = {f.name: values[flag_names.get(f.name, f.name)] for f in dataclasses.fields(cls)
                if flag_names.get(f.name, f.name) in values}
    return cls(**settings)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Section):
    shift_images: int = option(2000, "Test images of the evaluate stage's shift suite (11 "
                               "corruptions x 5 severities; 0: none).")

    def checks(self) -> list:
        return [(self.shift_images >= 0, f"--shift_images must be >= 0, got {self.shift_images}")]


@dataclasses.dataclass(frozen=True)
class ExportConfig(Section):
    export_dir: Optional[str] = option(
        None, "The serving directory the export stage publishes <model_name>/<version>/ into "
        "(TF Serving's layout); default <run_dir>/saved_models, the run's own.")
    model_name: Optional[str] = option(
        None, "The exported model's name (its folder under --export_dir); default the "
        "dataset's name (an image folder's own folder name), + _discriminative for "
        "--model=discriminative.")
    export_subset: bool = option(False, "Publish a run on --train_limit images into "
                                 "--export_dir (refused without: a smoke run would become the "
                                 "served version).", key=False)
    force_export: bool = option(False, "Export even a model the gate refuses (test accuracy "
                                "not clearly above chance, or far more test images rejected "
                                "than the deployed budget).", key=False)
    destination: str = derived(str, "Where the model goes: --export_dir, else "
                               "<run_dir>/saved_models.")
    limits: serving.Limits = library(serving.Limits)

    def checks(self) -> list:
        return [self.counts(),
                (self.model_name is None or MODEL_NAME.fullmatch(self.model_name) is not None,
                 f"--model_name={self.model_name!r}: letters, digits, '.', '_' and '-' only, "
                 "starting with a letter or digit (a folder and a TF Serving model name)")]


@dataclasses.dataclass(frozen=True)
class AttackConfig(Section):
    """The opt-in attack stage (paper section 5.3): adversarial.AttackSettings, capped for a
    2-core CPU."""

    attacks: tuple[str, ...] = option(adversarial.ATTACKS, "Attacks of the attack stage "
                                      "(opt-in: --stages=attack, after a run).")
    settings: adversarial.AttackSettings = library(adversarial.AttackSettings,
                                                   prefix="attack_")
    attack_baseline: Optional[str] = option(
        None, "run_dir of a --model=discriminative run of the same dataset with its own "
        "calibrate stage: its curves (FGSM, PGD and the adaptive PGD) are drawn beside ours.")
    attack_transfer_from: Optional[str] = option(
        None, "A run_dir (finished ingest, train and calibrate stages) or an exported "
        "SavedModel of the same classes: adaptive PGD-L-inf examples crafted on it are judged "
        "by our deployed rule (the transfer attack).")

    def checks(self) -> list:
        s, unknown = self.settings, sorted(set(self.attacks) - set(adversarial.ATTACKS))
        return [(not unknown, f"--attacks: unknown {unknown}; known: "
                 f"{', '.join(adversarial.ATTACKS)}"),
                ("pgd_accepted_linf_doubled" not in self.attacks
                 or "pgd_accepted_linf" in self.attacks, "--attacks: pgd_accepted_linf_doubled "
                 "checks the pgd_accepted_linf curve; select both"),
                (all(0 <= e <= 1 for e in s.epsilons) and len(s.epsilons) > 0,
                 f"--attack_epsilons must lie in [0, 1], got {list(s.epsilons)}"),
                (all(0 < e <= 1 for e in s.accepted_epsilons) and len(s.accepted_epsilons) > 0,
                 f"--attack_accepted_epsilons must lie in (0, 1], got "
                 f"{list(s.accepted_epsilons)}"),
                (all(e > 0 for e in s.accepted_l2_epsilons) and len(s.accepted_l2_epsilons) > 0,
                 f"--attack_accepted_l2_epsilons must be > 0, got "
                 f"{list(s.accepted_l2_epsilons)}"),
                self.counts(),
                (s.pgd_step_size > 0, f"--attack_pgd_step_size must be > 0, got "
                 f"{s.pgd_step_size}"),
                (0 < s.accepted_first_step <= 1, "--attack_accepted_first_step must lie in "
                 f"(0, 1], got {s.accepted_first_step}"),
                (all(k >= 0 for k in s.cw_confidences or ()),
                 f"--attack_cw_confidences must be >= 0, got {list(s.cw_confidences or ())}")]


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Section):
    """One pipeline run. `resolve()` fills the per-dataset presets and validates."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = dataclasses.field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    attack: AttackConfig = dataclasses.field(default_factory=AttackConfig)
    run_dir: Optional[str] = option(None, "Where stages write; default runs/<dataset>-<model>.")
    stages: Optional[tuple[str, ...]] = option(None, "Stages to run (default: all but the "
                                               "opt-in attack).")
    force: bool = option(False, "Rerun stages even when unchanged.")

    def resolve(self, known_stages: tuple[str, ...] = ()) -> PipelineConfig:
        """A copy with presets and defaults filled in; raises ConfigError."""
        c = self.replace(**self.flat())
        c.data.validate()
        c = c.replace(**{k: v for k, v in PRESETS[c.data.dataset].items() if c.flat()[k] is None})
        cal = c.calibrate
        cal = dataclasses.replace(
            cal, max_error_required=self.calibrate.max_error is not None,
            percentiles=tuple(map(rejection.percentile_key, cal.percentiles)),
            threshold_rule=cal.threshold_rule or getattr(
                scores.SCORES.classes.get(cal.score), "default_grouping", None),
            unfamiliar_rule=cal.unfamiliar_rule or (
                "conformal" if cal.reject_budget else "percentile"))
        watch = Watch(cal.reject_budget or 0.04, cal.reject_confidence or None,
                      cal.density_layers, cal.density_split)
        run_dir = c.run_dir or os.path.join("runs", f"{c.data.dataset}-{c.model.model}")
        c = dataclasses.replace(
            c, calibrate=cal, run_dir=run_dir,
            train=dataclasses.replace(c.train, watch=watch, fresh=c.force),
            export=dataclasses.replace(c.export, destination=c.export.export_dir or os.path.join(
                run_dir, "saved_models")))
        for name in ("model", "train", "calibrate", "evaluate", "export", "attack"):
            getattr(c, name).validate()
        t, budget = c.train, cal.reject_budget
        if not (t.holds_out or cal.max_error_required):  # nothing held out for the preset's
            cal = dataclasses.replace(cal, max_error=0)
            c = dataclasses.replace(c, calibrate=cal)
        unheld = not t.holds_out and (budget or cal.max_error)
        check([(not unheld, _unheld_promises(cal) if unheld else ""),
               (t.batch_size >= (2 if c.model.model == "sdim" else 1),  # negatives pair images
                 f"--batch_size must be >= 2 for SDIM, got {t.batch_size}"),
                (not (refusal := selection.subset_refusal(
                    t.train_limit, c.export.export_dir, c.export.export_subset)), refusal),
                (c.stages is None or not set(c.stages) - set(known_stages),
                 f"--stages: unknown {sorted(set(c.stages or ()) - set(known_stages))}; "
                 f"known: {', '.join(known_stages)}")])
        return c


def _unheld_promises(cal: CalibrateConfig) -> str:
    """The error of promises asked for without held-out images, with how many they need (the
    ambiguity rule's count is a search: computed only for this message)."""
    budget, max_error = cal.reject_budget, cal.max_error
    promised = {k: v for k, v in (("reject_budget", budget), ("max_error", max_error)) if v}
    needed = max(conformal.minimum_samples(budget, cal.reject_confidence or None) if budget
                 else 0, 2 * rules.ambiguous.minimum_samples(max_error, cal.max_error_confidence)
                 if max_error else 0)  # each rule on its half with both
    return (" and ".join(f"--{k}={v:g}" for k, v in promised.items())
            + (" promises its rate" if len(promised) == 1 else " promise their rates")
            + f" on held-out images: pass --validation_split=N (at least {needed} images), "
            "--validation_fraction or " + " ".join(f"--{k}=0" for k in promised)
            + (" (--export_percentile, no guarantee)" if budget else ""))


def define_attack_flags(flag_values=flags.FLAGS) -> None:
    """The attack stage's flags, defined here so that absl's --help leaves them out."""
    sections.define_flags(PipelineConfig, ("attack",), module_name=__name__,
                          flag_values=flag_values)
