"""`python -m pipeline.run --dataset=fashion_mnist`: every stage in order, skipping unchanged ones.

Each stage writes `<run_dir>/<stage>/` with a manifest (config hash, input hashes, outputs,
times, versions); a stage whose manifest matches is skipped, `--force` reruns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator

import tensorflow as tf
from absl import app, flags, logging

from pipeline import artifacts, faults
from pipeline import config as configs
from pipeline import run_dir as run_dirs
from pipeline.config import DISTRIBUTE, MODELS, SCORES, THRESHOLD_RULES, ConfigError, PipelineConfig
from pipeline.stages import attack, calibrate, evaluate, explain, export, ingest, train
from sdim_tf import data, density, mutual_info, precision, robust, serving


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    fields: tuple[str, ...]  # the config fields whose change reruns the stage
    needs: tuple[str, ...]  # upstream stages whose outputs it reads
    # (config, its own folder, {upstream stage: typed view, pipeline.run_dir}) -> outputs
    run: Callable[[PipelineConfig, pathlib.Path, dict], list[str]]
    default: bool = True  # part of a run without --stages
    # Rerun when an output changed since the stage wrote it; else (train: hours of work) a
    # one-line error naming the file.
    rerun_on_change: bool = True
    uses: tuple[str, ...] = ()  # upstream stages it reads when they have run
    # config -> {name: stage folder of another run it reads}; their reruns rerun it too
    external: Callable[[PipelineConfig], dict] | None = None


STAGES = (
    Stage("ingest", ("dataset", "data_dir"), (), ingest.run),
    Stage("train", train.FIELDS, ("ingest",), train.run, rerun_on_change=False),
    Stage("calibrate", calibrate.FIELDS, ("ingest", "train"), calibrate.run),
    Stage("evaluate", evaluate.FIELDS, ("ingest", "train", "calibrate"), evaluate.run),
    Stage("explain", explain.FIELDS, ("ingest", "train", "calibrate"), explain.run),
    Stage("export", export.FIELDS, ("ingest", "train", "calibrate", "evaluate"), export.run),
    Stage("attack", attack.FIELDS, ("ingest", "train", "calibrate"), attack.run, default=False,
          uses=("export",), external=attack.external_inputs),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


class StorageError(RuntimeError):
    """A stage could not write its outputs: the disk is full or a file size limit was hit."""


USER_ERRORS = (ConfigError, data.DataError, train.TrainingError, run_dirs.ArtifactError,
               StorageError)
# ENOSPC, EFBIG (a file size limit), EDQUOT. TensorFlow's C++ writers report them as an
# OpError (ResourceExhausted, OutOfRange) whose message carries the C library's text.
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

# sdim_tf does not import pipeline: its SavedModel export reaches the fault point this way.
serving.before_rename = lambda folder: faults.point("serving.before_rename")


@contextlib.contextmanager
def _storage_errors(writer: str) -> Iterator[None]:
    """Turns a full disk or a file size limit met by `writer` into a StorageError."""
    try:
        yield
    except Exception as e:
        problem = _storage_problem(e)
        if problem is None:
            raise
        # Every write goes through a temporary, so nothing is half-written: without its
        # manifest the stage reruns; earlier checkpoints and SavedModel versions stay valid.
        raise StorageError(f"{writer}: a write failed ({problem}): the disk is full or a file "
                           "size limit was reached; nothing was half-written, free space and "
                           "rerun the same command") from None


def _storage_problem(error: BaseException | None) -> str | None:
    """What ran out ("No space left on device: <file>"), when `error` or an exception it
    came from is a full disk or a file size limit; else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return os.strerror(error.errno) + (f": {error.filename}" if error.filename else "")
        if isinstance(error, tf.errors.OpError):
            for code in _FULL:
                text = os.strerror(code)
                if text in error.message:  # "<file>; File too large [Op:SaveV2]"
                    path = error.message.partition(f"; {text}")[0].rpartition("}} ")[2]
                    return f"{text}: {path}" if path != error.message else text
        error = error.__cause__ or error.__context__
    return None


def _check_writable(run_dir: pathlib.Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--run_dir {run_dir} is not writable ({e.strerror or e})") from None


def _write_run_readme(run_dir: pathlib.Path, config: PipelineConfig) -> None:
    default = PipelineConfig()
    def text(v):
        if isinstance(v, tuple):
            return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        return v

    flags_used = " ".join(
        f"--{f.name}={text(v)}"
        for f in dataclasses.fields(config)
        if (v := getattr(config, f.name)) != getattr(default, f.name)
        and f.name not in ("n", "run_dir", "force"))
    lines = [f"# Run: {config.dataset} ({config.model})", "",
             f"Command: `python -m pipeline.run {flags_used} --run_dir={run_dir}`", "",
             "| stage | report | finished | outputs |", "|---|---|---|---|"]
    for stage in STAGES:
        manifest = run_dir / stage.name / artifacts.MANIFEST
        if not manifest.exists():
            continue
        m = artifacts.read_json(manifest)
        links = ", ".join(f"[{o}]({stage.name}/{o})" for o in m["outputs"][:8])
        reports = ", ".join(f"[{o}]({stage.name}/{o})" for o in m["outputs"] if o.endswith(".md"))
        lines.append(f"| [{stage.name}]({stage.name}/) | {reports or '—'} | {m['finished']} | "
                     f"{links} |")
    artifacts.write_text(run_dir / "README.md", "\n".join(lines) + "\n")


def run(config: PipelineConfig) -> pathlib.Path:
    """Runs the selected stages of `config`; returns the run directory."""
    config = config.resolve(STAGE_NAMES)
    run_dir = pathlib.Path(config.run_dir)
    _check_writable(run_dir)
    selected = [s for s in STAGES
                if (s.name in config.stages if config.stages else s.default)]
    for stale in artifacts.remove_stale_temps(run_dir):
        logging.info("removed %s, left by a process that died while writing it", stale)
    store = run_dirs.Run(run_dir)
    for stage in selected:
        stage_dir = run_dir / stage.name
        upstream = {name: store.artifact(name) for name in stage.needs}
        upstream.update({name: view for name in stage.uses
                         if (view := store.artifact(name)).exists()})
        for name, view in upstream.items():
            if not view.exists():
                raise ConfigError(f"stage {stage.name} needs the outputs of {name} in "
                                  f"{view.folder}; run it first (--stages={name},{stage.name})")
            view.check_schema()
            changed = artifacts.changed_outputs(view.folder)
            if changed:
                raise run_dirs.ArtifactError(
                    f"{view.folder / changed[0]} changed since {name} wrote it (sha256 differs "
                    f"from its manifest); rerun {name} with --force --stages={name}")
        digest = artifacts.config_hash({"stage": stage.name, **config.fields(stage.fields)})
        # an optional stage that has not run hashes as missing: running it reruns this one
        inputs = artifacts.input_hashes({name: store.artifact(name).folder
                                         for name in (*stage.needs, *stage.uses)})
        if stage.external is not None:
            inputs.update(artifacts.input_hashes(stage.external(config)))
        changed = artifacts.changed_outputs(stage_dir)
        if changed and not (config.force or stage.rerun_on_change):
            raise run_dirs.ArtifactError(
                f"{stage_dir / changed[0]} changed since {stage.name} wrote it (sha256 differs "
                f"from its manifest); restore it or rerun with --force")
        if not config.force and artifacts.manifest_matches(stage_dir, digest, inputs):
            logging.info("%s: unchanged since its last run, skipped (--force reruns it)",
                         stage.name)
            continue
        if changed:
            logging.warning("%s: %s changed since it was written; rerunning the stage",
                            stage.name, ", ".join(changed))
        logging.info("%s: running", stage.name)
        (stage_dir / artifacts.MANIFEST).unlink(missing_ok=True)
        started = time.time()
        with _storage_errors(f"stage {stage.name}"):
            stage_dir.mkdir(parents=True, exist_ok=True)
            outputs = stage.run(config, stage_dir, upstream)
            artifacts.write_manifest(stage_dir, stage=stage.name, digest=digest,
                                     config=config.fields(stage.fields), inputs=inputs,
                                     outputs=outputs, started=started, finished=time.time(),
                                     schema_version=run_dirs.SCHEMA_VERSION)
        logging.info("%s: done in %.1f s", stage.name, time.time() - started)
    with _storage_errors(f"{run_dir / 'README.md'}"):
        _write_run_readme(run_dir, config)
    return run_dir


_D = PipelineConfig()
FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", _D.dataset, f"Dataset: {', '.join(data.DATASETS)}.")
flags.DEFINE_string("data_dir", None, "Folder holding <dataset>/train-images-idx3-ubyte.gz etc. "
                    "(or <dataset>/train/<class>/ images); default: $SDIM_DATA_DIR, then tfds.")
flags.DEFINE_string("run_dir", None, "Where stages write; default runs/<dataset>-<model>.")
flags.DEFINE_enum("model", _D.model, MODELS, "SDIM or its discriminative counterpart.")
flags.DEFINE_enum("critic", _D.critic, list(mutual_info.CRITICS),
                  "Local-MI critic: concat (the paper's, 4x4 map) or dot (the authors' code's, "
                  "16x16 map).")
flags.DEFINE_enum("mi_bound", _D.mi_bound, list(mutual_info.BOUNDS), "MI lower bound.")
flags.DEFINE_integer("n", None, "ResNet depth 8n+2; default per dataset (1, or 3 for "
                     "CIFAR10/SVHN).")
flags.DEFINE_integer("rep_dim", _D.rep_dim, "Representation size d.")
flags.DEFINE_float("alpha", _D.alpha, "Weight of the MI loss.")
flags.DEFINE_float("beta", _D.beta, "Weight of the NLL loss.")
flags.DEFINE_float("gamma", _D.gamma, "Weight of the likelihood-margin loss.")
flags.DEFINE_float("margin", _D.margin, "Margin K per dimension of the likelihood-margin loss.")
flags.DEFINE_float("log_scale_floor", None, "Floor on the class log-scales (off by default).")
flags.DEFINE_float("outlier_weight", _D.outlier_weight, "Weight of the outlier-margin term "
                   "on 2x2 mosaics of training images (not in the paper; 0: off).")
flags.DEFINE_float("outlier_margin", _D.outlier_margin, "Margin K per dimension of the "
                   "outlier-margin term, below the true class of the mosaic's first image.")
# Adversarial training (sdim_tf.robust), off unless --robust_epsilon > 0.
flags.DEFINE_float("robust_epsilon", _D.robust_epsilon, "Adversarial training: L-inf budget "
                   "of the examples each training step makes against the model's class scores "
                   "(not in the paper; 0: off).")
flags.DEFINE_enum("robust_attack", _D.robust_attack, list(robust.ATTACKS), "pgd: PGD from a "
                  "random start; fgsm: one step of 1.25 epsilon from a random start (fast).")
flags.DEFINE_integer("robust_steps", _D.robust_steps, "PGD steps of --robust_attack=pgd.")
flags.DEFINE_float("robust_step_size", None, "Step of the training attack; default 2.5 "
                   "epsilon / steps (pgd), 1.25 epsilon (fgsm).")
flags.DEFINE_enum("robust_mode", _D.robust_mode, list(robust.MODES), "classify: the "
                  "supervised losses on the adversarial examples; reject: their best class "
                  "score --robust_margin per dimension below the clean true class, so the "
                  "threshold refuses them; both.")
flags.DEFINE_float("robust_weight", _D.robust_weight, "Weight of the adversarial terms.")
flags.DEFINE_float("robust_margin", _D.robust_margin, "Margin K per dimension of the reject "
                   "term.")
flags.DEFINE_bool("robust_clean", _D.robust_clean, "Keep the clean batch in the loss beside "
                  "its adversarial examples; --norobust_clean: these alone in its place "
                  "(Madry et al.; about one pass cheaper; --robust_mode=classify only).")
flags.DEFINE_integer("epochs", _D.epochs, "Training epochs (paper: 500; 50 reach its "
                     "accuracy; 0: the untrained network, a baseline).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, configs.LR_SCHEDULES, "cosine: decays the "
                  "learning rate to 0 over --epochs (so a finished run cannot be extended); "
                  "constant: the paper's.")
flags.DEFINE_integer("seed", _D.seed, "Random seed (weights, shuffling, augmentation).")
flags.DEFINE_list("stages", None, "Stages to run (default: all of "
                  f"{','.join(s.name for s in STAGES if s.default)}).")
flags.DEFINE_integer("train_limit", None, "Train on the first N training examples (smoke runs).")
flags.DEFINE_enum("distribute", _D.distribute, DISTRIBUTE,
                  "auto: MirroredStrategy on >1 GPU, MultiWorkerMirroredStrategy when TF_CONFIG "
                  "names several workers, else the default strategy.")
flags.DEFINE_enum("mixed_precision", _D.mixed_precision, list(precision.PRECISIONS),
                  "Training compute dtype: auto = bfloat16 where the hardware has it natively "
                  "(CPU avx512_bf16/amx_bf16, GPU compute capability >= 8.0), else float32 "
                  "(losses stay float32; exports always compute in float32).")
flags.DEFINE_enum("jit_compile", _D.jit_compile, list(precision.JIT_COMPILE),
                  "XLA for the training step: auto = on with GPUs, off on CPUs.")
flags.DEFINE_bool("deterministic", False, "Deterministic TF ops (slower).")
flags.DEFINE_list("percentiles", [str(p) for p in _D.percentiles],
                  "Threshold percentiles of the training log-likelihoods (paper: 1,2).")
flags.DEFINE_integer("validation_split", None,
                     "Hold out the last N training images for calibration; default per "
                     "dataset (5000; 0 for image_folder). 0: calibrate on the training "
                     "images, as the paper.")
flags.DEFINE_enum("score", _D.score, SCORES,
                  "Rejection score: the model's own output (SDIM: log p(x|c), the paper's) "
                  "or feature_density (tied Gaussians on encoder layers, fitted after "
                  "training; see docs/results.md).")
flags.DEFINE_enum("threshold_rule", None, THRESHOLD_RULES,
                  "Thresholds per class (the paper's) or one shared by all classes; default "
                  "shared for --score=feature_density, else per_class.")
flags.DEFINE_list("density_layers", list(_D.density_layers),
                  f"Encoder layers of --score=feature_density, among {', '.join(density.LAYERS)}.")
flags.DEFINE_bool("density_split", _D.density_split, "--score=feature_density: score each "
                  "layer as two standardised terms, within the span of the class means and "
                  "outside it (sdim_tf.density), instead of one.")
flags.DEFINE_string("export_dir", _D.export_dir, "Where the export stage writes SavedModels.")
flags.DEFINE_integer("max_image_side", _D.max_image_side, "Export: classify_encoded refuses "
                     "(reason too_large) an image whose header declares a longer side.")
flags.DEFINE_integer("max_image_bytes", _D.max_image_bytes, "Export: ... or more bytes.")
flags.DEFINE_integer("max_request_bytes", _D.max_request_bytes, "Export: classify_encoded "
                     "refuses a request of more bytes (InvalidArgument).")
flags.DEFINE_integer("max_request_pixels", _D.max_request_pixels, "Export: classify_encoded "
                     "refuses a request whose images' headers declare more pixels in all "
                     "(InvalidArgument; decoding time grows with them).")
flags.DEFINE_integer("max_batch", _D.max_batch, "Export: every signature refuses a request of "
                     "more images (InvalidArgument).")
flags.DEFINE_float("export_percentile", _D.export_percentile,
                   "The calibrated percentile whose thresholds the SavedModel applies when "
                   "--reject_budget=0.")
flags.DEFINE_float("reject_budget", None,
                   "Deploy thresholds that reject at most this share of new images drawn like "
                   "the held-out ones (split conformal; needs --validation_split); default "
                   "0.04, 0 for image_folder. 0: use --export_percentile, no guarantee.")
flags.DEFINE_float("reject_confidence", _D.reject_confidence,
                   "Confidence of the --reject_budget guarantee over the draw of the held-out "
                   "images (0: on average only).")
flags.DEFINE_integer("shift_images", _D.shift_images, "Test images of the evaluate stage's "
                     "shift suite (11 corruptions x 5 severities; 0: none).")
flags.DEFINE_bool("force", False, "Rerun stages even when unchanged.")
flags.DEFINE_list("attacks", list(_D.attacks), "Attacks of the attack stage (opt-in: "
                  "--stages=attack, after a run).")
_ATTACK_FLAGS = {
    "images": "The curves (FGSM, PGD, adaptive PGD) and DeepFool attack the first N test images "
              "the deployed model classifies correctly and accepts (paper: 1000).",
    "epsilons": "L-inf budgets of the FGSM and PGD curves in the model's input space (32x32 "
                "images in [0, 1]; paper Figures 4 and 5: 0 to 0.5).",
    "pgd_steps": "PGD iterations (cleverhans' default, as in the paper).",
    "pgd_step_size": "PGD step, capped at each epsilon.",
    "deepfool_steps": "DeepFool iterations.",
    "boundary_images": "Boundary attacks the first N attacked images.",
    "boundary_steps": "Boundary attack iterations (ART's default 5000 takes hours per image "
                      "on 2 cores).",
    "local_search_images": "LocalSearch attacks the first N attacked images.",
    "local_search_rounds": "LocalSearch rounds (Narodytska & Kasiviswanathan: 150).",
    "cw_images": "Targeted CW-L2 (and cw_accepted) attack the first N attacked images towards "
                 "every other class.",
    "cw_steps": "CW-L2 gradient steps per binary-search step.",
    "cw_search_steps": "CW-L2 (and cw_accepted) binary-search steps over the constant c.",
    "accepted_epsilons": "L-inf budgets of the adaptive PGD curve (pgd_accepted_linf) and "
                         "square_accepted.",
    "accepted_l2_epsilons": "L2 budgets of the adaptive PGD curve pgd_accepted_l2.",
    "accepted_steps": "Steps of the adaptive attacks (PGD per restart; cw_accepted per "
                      "binary-search step).",
    "accepted_schedule": "Step sizes of the adaptive PGD: cosine (from epsilon down to 0; more "
                         "steps search longer) or constant (2.5 epsilon / steps, Madry et al.).",
    "accepted_restarts": "Starts of the adaptive PGD (the first from the image, the others at "
                         "random in the ball); pgd_accepted_linf_doubled runs twice the steps "
                         "and restarts.",
    "square_images": "square_accepted (gradient-free, a sanity check) attacks the first N "
                     "attacked images.",
    "square_queries": "Queries per image of square_accepted.",
    "replay_images": "Adversarial images per attack replayed against the exported SavedModel.",
}
for _name, _help in _ATTACK_FLAGS.items():
    _default = getattr(_D, "attack_" + _name)
    _define = {tuple: flags.DEFINE_list, int: flags.DEFINE_integer,
               float: flags.DEFINE_float, str: flags.DEFINE_string}[type(_default)]
    _define("attack_" + _name, [str(v) for v in _default] if isinstance(_default, tuple)
            else _default, _help)
flags.DEFINE_list("attack_cw_confidences", None, "CW-L2 confidences kappa on the scale of the "
                  "attacked score; default per --score: 0,500,1000 for model (the paper's), "
                  "0,1,2,4 times the standard deviation of the held-out images' top scores for "
                  "feature_density.")
flags.DEFINE_string("attack_baseline", None, "run_dir of a --model=discriminative run of the "
                    "same dataset with its own calibrate stage: its curves (FGSM, PGD and the "
                    "adaptive PGD) are drawn beside ours.")


def config_from_flags() -> PipelineConfig:
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    values = {name: FLAGS[name].value for name in names}
    if values["stages"] is not None:
        values["stages"] = tuple(values["stages"])
    values["attacks"] = tuple(values["attacks"])
    values["density_layers"] = tuple(values["density_layers"])
    for name in ("percentiles", "attack_epsilons", "attack_cw_confidences",
                 "attack_accepted_epsilons", "attack_accepted_l2_epsilons"):
        if values[name] is None:  # a default resolved later
            continue
        try:
            values[name] = tuple(float(p) for p in values[name])
        except ValueError:
            raise ConfigError(f"--{name} must be numbers, got {values[name]}") from None
    return PipelineConfig(**values)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        run_dir = run(config_from_flags())
    except USER_ERRORS as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")
    logging.info("run finished: %s", run_dir / "README.md")


if __name__ == "__main__":
    app.run(main)
