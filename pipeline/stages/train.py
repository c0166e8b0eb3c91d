"""Train: TFRecords -> SDIM (or the discriminative baseline) under a tf.distribute strategy.

Keeps two checkpoints, as the paper evaluates the one with the minimum training loss:
`checkpoints/best.keras` (later stages use it) and `checkpoints/last.keras` (with optimizer
state, for resuming). A killed run resumes from the last completed epoch when rerun: an
epoch's checkpoints are written beside the live ones, committed with their sha256 by
state.json, then renamed into place, so a kill anywhere leaves one committed epoch whole.
One custom loop over `model.train_step` serves every strategy (Keras 3 `fit` under
MultiWorkerMirroredStrategy has an open bug, keras-team/keras#20585).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import sdim_tf
from pipeline import artifacts, faults
from pipeline.config import ROBUST_FIELDS, PipelineConfig
from pipeline.run_dir import ArtifactError, TrainedModel, load_checkpoint
from sdim_tf import data, monitoring, outliers, overfitting_guard, precision

FIELDS = ("model", "critic", "mi_bound", "n", "rep_dim", "alpha", "beta", "gamma", "margin",
          "log_scale_floor", "outlier_weight", "outlier_margin", "epochs", "batch_size",
          "learning_rate", "lr_schedule", "seed", "train_limit", "mixed_precision",
          "deterministic", "validation_split", *ROBUST_FIELDS)
BEST, LAST, STATE, HISTORY = (TrainedModel.BEST, TrainedModel.LAST, TrainedModel.STATE,
                              TrainedModel.HISTORY)


# Per-epoch watching, within ~5% of an epoch (history.csv: test_seconds, monitor_seconds):
# test accuracy on the first TEST_SUBSET test images (all of them after the last epoch), and
# the deployed-style rejection quality (sdim_tf.monitoring) on held-out images.
TEST_SUBSET = 1000
MONITOR_FIT, MONITOR_HELD_OUT, MONITOR_OUTLIERS = 2000, 1000, 250
# With adversarial training: FGSM and PGD-10 accuracy on the first GUARD_IMAGES held-out
# images each epoch (sdim_tf.overfitting_guard), about 2% of an MNIST epoch.
GUARD_IMAGES, GUARD_COLUMNS = 256, ("robust/fgsm_accuracy", "robust/pgd_accuracy")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, corrupt checkpoint); the message says why."""


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """`auto`: Mirrored on >1 GPU, MultiWorkerMirrored when TF_CONFIG names >1 worker."""
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "auto":
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        workers = sum(len(v) for k, v in cluster.items() if k in ("chief", "worker"))
        if workers > 1:
            kind = "multi_worker"
        elif len(gpus) > 1:
            kind = "mirrored"
        else:
            return tf.distribute.get_strategy()
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def learning_rate(config: PipelineConfig, steps_per_epoch: int | None):
    """Adam's learning rate: the constant, or a cosine decay from it to 0 over the run's
    steps (the optimizer's step count, checkpointed with it, carries it across resumes)."""
    if config.lr_schedule == "constant" or config.epochs == 0:  # 0: never a step
        return config.learning_rate
    if not steps_per_epoch:
        raise ValueError(f"--lr_schedule={config.lr_schedule} needs the steps per epoch")
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(config.epochs * steps_per_epoch, 1))


def build_model(config: PipelineConfig, num_classes: int, channels: int,
                steps_per_epoch: int | None = None) -> keras.Model:
    """The model a config asks for, compiled with Adam (`learning_rate`) and XLA off."""
    input_shape = (data.IMAGE_SIZE, data.IMAGE_SIZE, channels)
    if config.model == "sdim":
        model = sdim_tf.SDIM(
            num_classes, input_shape, n=config.n, rep_dim=config.rep_dim,
            critic=config.critic, alpha=config.alpha, beta=config.beta, gamma=config.gamma,
            margin=config.margin, mi_bound=config.mi_bound,
            log_scale_floor=config.log_scale_floor, outlier_weight=config.outlier_weight,
            outlier_margin=config.outlier_margin, robust=config.robust_training().to_config())
    else:
        model = sdim_tf.DiscriminativeClassifier(num_classes, input_shape, n=config.n)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(config, steps_per_epoch)))
    return model


def make_train_step(model: keras.Model, strategy: tf.distribute.Strategy,
                    jit_compile: bool = False):
    """A tf.function running `model.train_step` on each replica's share of a global batch;
    with `jit_compile`, each replica's step is one XLA cluster (TF's recipe for XLA under a
    distribution strategy)."""
    train_step = tf.function(model.train_step, jit_compile=True) if jit_compile \
        else model.train_step

    @tf.function
    def step(iterator):
        strategy.run(train_step, args=(next(iterator),))
        # Read in cross-replica context: the metric variables sum over replicas there.
        return {m.name: m.result() for m in model.metrics}

    return step


def run_epoch(step, model, strategy, dataset, steps: int, progress: bool = True,
              step_seconds: list | None = None) -> dict:
    """`steps` global batches through `step` (from make_train_step); the epoch's metrics.
    Each step's wall time is appended to `step_seconds` (reading the metrics waits for it)."""
    for metric in model.metrics:
        metric.reset_state()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    # A bar redrawn per step floods logs that are not a terminal: there, one line per epoch.
    verbose = (1 if sys.stdout.isatty() else 2) if progress else 0
    bar = keras.utils.Progbar(steps, verbose=verbose,
                              stateful_metrics=[m.name for m in model.metrics])
    logs = {}
    for i in range(steps):
        started = time.perf_counter()
        logs = {k: float(v) for k, v in step(iterator).items()}
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - started)
        bar.update(i + 1, list(logs.items()))
        faults.point("train.step")
    return logs


def class_predictor(model: keras.Model):
    """images -> predicted class ids, traced once per run (each new tf.function costs
    seconds of tracing and graph optimisation)."""
    return tf.function(lambda images: tf.argmax(model(images, training=False), axis=1))


def test_accuracy(predict, dataset: tf.data.Dataset) -> float:
    """Accuracy of `predict` (from class_predictor) over (images, labels) batches."""
    correct = total = 0
    for images, labels in dataset:
        correct += int(tf.reduce_sum(tf.cast(predict(images) == labels, tf.int32)))
        total += int(labels.shape[0])
    return correct / max(total, 1)


def monitor_data(config: PipelineConfig, examples, num_train: int) -> dict | None:
    """The fixed images `monitoring.rejection_quality` watches each epoch: a trained subset
    for the fit, held-out images (None without --validation_split) and outliers built from
    them."""
    if not config.validation_split:
        logging.info("train: no held-out images (--validation_split=0): rejection quality "
                     "is not watched")
        return None
    fit = examples.arrays("train", limit=min(MONITOR_FIT, num_train))
    held_out = examples.arrays("train", skip=examples.num_examples("train")
                               - config.validation_split,
                               limit=min(MONITOR_HELD_OUT, config.validation_split))
    sources = held_out[0][:MONITOR_OUTLIERS], held_out[1][:MONITOR_OUTLIERS]
    built = {**outliers.proxy_outliers(sources[0], config.seed),
             **outliers.part_outliers(*sources, seed=config.seed)}
    return {"fit": fit, "held_out": held_out, "outliers": built,
            "budget": config.reject_budget or 0.04,
            "layers": (monitoring.layer_set(config.density_layers, config.density_split),),
            "rule": "conformal", "confidence": config.reject_confidence or None}


def collapse(history: list[dict], logs: dict, num_classes: int) -> str | None:
    """Why training diverged though its loss stayed finite, or None: a model that had learned
    (train accuracy >= 0.5 in some epoch) falling to at most twice chance in this one."""
    if "accuracy" not in logs:
        return None
    best = max(history, key=lambda row: row.get("accuracy", 0.0), default=None)
    if best is None or best.get("accuracy", 0.0) < 0.5:
        return None
    if logs["accuracy"] > 2.0 / num_classes:
        return None
    return (f"train accuracy {logs['accuracy']:.3f} against {best['accuracy']:.3f} in epoch "
            f"{best['epoch']} (loss {logs.get('loss')})")


def _watch(monitor: monitoring.RejectionMonitor | None) -> dict:
    """history.csv columns of this epoch's rejection quality ("monitor/<score>/<figure>")."""
    if monitor is None:
        return {}
    quality = monitor()
    return {f"monitor/{k}": round(v, 6) for k, v in monitoring.flat(quality).items()
            if "/outlier_" not in k and k != "seconds"}


def _guard(config: PipelineConfig, model, watched: dict | None, history: list[dict]
           ) -> overfitting_guard.OverfittingGuard | None:
    """The catastrophic-overfitting guard of an adversarially trained run with held-out
    images (None otherwise), its history carried over from the epochs already trained."""
    settings = config.robust_training()
    if not settings.enabled or watched is None:
        return None
    images, labels = (a[:GUARD_IMAGES] for a in watched["held_out"])
    guard = overfitting_guard.OverfittingGuard(model, images, labels, settings.epsilon,
                                               seed=config.seed)
    guard.history = [overfitting_guard.Measurement(*(row[k] for k in GUARD_COLUMNS))
                     for row in history if all(k in row for k in GUARD_COLUMNS)]
    return guard


def _check_guard(guard, config: PipelineConfig, epoch: int, stage_dir: pathlib.Path) -> dict:
    """This epoch's guard columns; raises TrainingError on a collapse where the adversarial
    examples are to be classified (--robust_mode=reject only logs it: there they need not
    be)."""
    if guard is None:
        return {}
    measured, why = guard.check()
    if why and config.robust_training().classifies:
        raise TrainingError(
            f"catastrophic overfitting in epoch {epoch} ({why}, epsilon "
            f"{config.robust_epsilon:g}); the last good checkpoint (epoch {epoch - 1}) is kept "
            f"in {stage_dir / LAST}; train afresh (--force) with --robust_attack=pgd, or "
            "a smaller --robust_step_size")
    if why:
        logging.warning("train: epoch %d: %s", epoch, why)
    return dict(zip(GUARD_COLUMNS, (round(measured.fgsm_accuracy, 6),
                                    round(measured.pgd_accuracy, 6)), strict=True))


def _next(path: pathlib.Path) -> pathlib.Path:
    """Where an epoch's checkpoint waits, complete, until state.json commits the epoch."""
    return path.with_name(path.name + ".next")


def _stage_checkpoints(model: keras.Model, stage_dir: pathlib.Path, best: bool,
                       committed: dict) -> dict:
    """Writes this epoch's checkpoints beside the live ones (`<name>.next`); returns the
    sha256 of each checkpoint as it will be once `_settle_checkpoints` puts them in place.
    `committed`: the digests state.json holds (an unchanged best keeps its own)."""
    with artifacts.atomic_file(_next(stage_dir / LAST), suffix=".keras") as tmp:
        model.save(tmp)
    last = artifacts.sha256_file(_next(stage_dir / LAST))
    if best:
        with artifacts.atomic_file(_next(stage_dir / BEST)) as tmp:
            shutil.copyfile(_next(stage_dir / LAST), tmp)
    if best:
        return {LAST: last, BEST: last}
    return {LAST: last, BEST: committed.get(BEST) or artifacts.sha256_file(stage_dir / BEST)}


def _settle_checkpoints(stage_dir: pathlib.Path, recorded: dict) -> None:
    """Puts in place the checkpoints state.json committed (`recorded`: name -> sha256).

    A `.next` checkpoint it records is renamed into place (a kill came between the commit
    and the rename); one it does not record is dropped (the kill came before the commit).
    A checkpoint that then differs is an error naming it: a resumed run never trains on,
    nor later stages use, bytes nobody wrote.
    """
    for name, digest in recorded.items():
        final, pending = stage_dir / name, _next(stage_dir / name)
        if pending.exists():
            if artifacts.sha256_file(pending) == digest:
                artifacts.publish(pending, final)
            else:
                pending.unlink()
        if not final.is_file() or artifacts.sha256_file(final) != digest:
            raise TrainingError(f"checkpoint {final} changed since train wrote it (sha256 "
                                f"differs from {stage_dir / STATE}); restore it or rerun with "
                                "--force")


def _write_history(path: pathlib.Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns)
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_text(path, out.getvalue())


def _resume_state(trained: TrainedModel, config: PipelineConfig,
                  resume_hash: Callable[..., str]) -> dict | None:
    """The state to resume from, or None to start afresh. `resume_hash(**changes)`: the
    hash of the configuration with `changes` (PipelineConfig fields)."""
    state_path = trained.folder / STATE
    if config.force or not state_path.exists():
        return None
    try:
        state = trained.state()
    except ArtifactError:
        raise TrainingError(f"{state_path} is corrupt; rerun with --force") from None
    if state.get("resume_hash") == resume_hash():
        return state
    # Starting afresh deletes the trained model: where a run cannot go on only because of
    # the schedule (its length, or the default before cosine), say so instead.
    for planned in {state.get("epochs"), state.get("epoch")} - {None, config.epochs}:
        if state.get("resume_hash") == resume_hash(epochs=planned):
            raise TrainingError(
                f"{trained.folder} holds {state['epoch']} of {planned} epochs trained with "
                f"--lr_schedule={config.lr_schedule}, whose learning rate decays over the "
                f"run's planned length, so --epochs={config.epochs} cannot continue it: "
                f"rerun with --epochs={planned} to resume it, --force to start afresh, or "
                f"train into another --run_dir (--lr_schedule=constant runs can be extended)")
    if config.lr_schedule != "constant" and state.get("resume_hash") == resume_hash(
            lr_schedule="constant"):
        raise TrainingError(
            f"{trained.folder} holds {state['epoch']} epoch(s) trained with "
            f"--lr_schedule=constant (the default before cosine): rerun with "
            f"--lr_schedule=constant to resume or use it, --force to start afresh, or train "
            f"into another --run_dir")
    logging.info("train: configuration changed, starting afresh")
    return None


def run(config: PipelineConfig, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    """Trains to `config.epochs`, resuming from `stage_dir` when a compatible run stopped.
    The dtype policy of training is set for training only: later stages compute in float32."""
    previous = keras.mixed_precision.global_policy()
    try:
        return _train(config, stage_dir, upstream)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _precision(config: PipelineConfig, state: dict | None,
               hardware: precision.Hardware) -> tuple[str, str]:
    """(float32 or bfloat16, why): a resumed run keeps the precision it started with, on
    whatever machine it resumes; a new one resolves --mixed_precision on this hardware."""
    if state is not None and "precision" in state:
        return state["precision"], state["precision_reason"] + " (when the run started)"
    if state is not None:  # a run from before "auto": its flag was explicit
        return config.mixed_precision, f"--mixed_precision={config.mixed_precision}"
    return precision.resolve(config.mixed_precision, hardware)


def _train(config: PipelineConfig, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    examples = upstream["ingest"]
    trained = TrainedModel(stage_dir)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = make_strategy(config.distribute)
    chief = is_chief(strategy)
    ingest_hash = artifacts.input_hashes({"ingest": examples.folder})

    def resume_hash(**changes) -> str:
        changed = dataclasses.replace(config, **changes)
        # more epochs resume a run, unless its learning rate was scheduled over its length
        return artifacts.config_hash(
            {k: v for k, v in changed.fields(FIELDS).items()
             if k != "epochs" or changed.lr_schedule != "constant"} | {"ingest": ingest_hash})

    state = _resume_state(trained, config, resume_hash)
    if state is not None and state["epoch"] > config.epochs:
        logging.info("train: %d epochs done, %d asked: starting afresh", state["epoch"],
                     config.epochs)
        state = None
    if state is None and chief:
        for name in ("checkpoints", "logs"):
            shutil.rmtree(stage_dir / name, ignore_errors=True)
        for name in (STATE, HISTORY):
            (stage_dir / name).unlink(missing_ok=True)
    (stage_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    _, num_train = config.train_examples(examples.num_examples("train"))
    steps = num_train // config.batch_size
    hardware = precision.Hardware.detect()
    chosen, why = _precision(config, state, hardware)
    keras.mixed_precision.set_global_policy(precision.POLICIES[chosen])
    logging.info("train: computing in %s (%s)", chosen, why)

    with strategy.scope():
        if state is not None:
            _settle_checkpoints(stage_dir, state.get("checkpoints", {}))  # older: none
            try:
                model = load_checkpoint(trained.last_path)
            except ArtifactError as e:
                raise TrainingError(str(e)) from None
            logging.info("train: resuming after epoch %d of %d", state["epoch"], config.epochs)
        else:
            model = build_model(config, examples.num_classes, examples.image_shape[-1],
                                steps)
            state = {"resume_hash": resume_hash(), "epoch": 0,
                     "best_loss": None, "best_epoch": None, "history": []}
    state["epochs"] = config.epochs  # planned: names the length a scheduled run needs
    state.setdefault("precision", chosen)
    state.setdefault("precision_reason", why)
    if config.robust_epsilon:
        state["robust"] = config.robust_training().to_config()
    logging.info("train: %s, %d trainable parameters, strategy %s with %d replica(s)",
                 type(model).__name__, model.trainable_parameter_count(),
                 type(strategy).__name__, strategy.num_replicas_in_sync)

    test_ds = examples.dataset("test", limit=TEST_SUBSET)
    watched = monitor_data(config, examples, num_train) if chief else None
    monitor = monitoring.RejectionMonitor(model, **watched) if watched else None
    predict = class_predictor(model)
    guard = _guard(config, model, watched, state["history"])
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    step = make_train_step(model, strategy,
                           jit_compile=precision.jit_compile(config.jit_compile, hardware))
    writer = tf.summary.create_file_writer(str(stage_dir / "logs" / "train")) if chief else None

    if config.epochs == 0 and chief and state["epoch"] == 0:
        # The untrained network as a baseline: its initial weights go through the same
        # calibrate, evaluate and export as a trained model's.
        logging.warning("train: --epochs=0: the untrained network (seed %d) is the model",
                        config.seed)
        state["checkpoints"] = _stage_checkpoints(model, stage_dir, True, {})
        _write_history(stage_dir / HISTORY, [])
        trained.write_state(state)
        _settle_checkpoints(stage_dir, state["checkpoints"])
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        start = time.time()
        train_ds = examples.dataset(
            "train", limit=num_train, batch_size=config.batch_size, training=True,
            seed=config.seed * 100_003 + epoch).with_options(options)
        logging.info("train: epoch %d/%d", epoch, config.epochs)
        step_seconds = []
        logs = run_epoch(step, model, strategy, train_ds, steps, step_seconds=step_seconds)
        train_seconds = time.time() - start
        why = (f"loss {logs.get('loss')}" if not all(math.isfinite(v) for v in logs.values())
               else collapse(state["history"], logs, examples.num_classes))
        if why:
            raise TrainingError(
                f"training diverged in epoch {epoch} ({why}); the last good checkpoint (epoch "
                f"{state['epoch']}) is kept in {stage_dir / LAST}; the same command resumes "
                "from it and may diverge again, a lower --learning_rate (or --outlier_weight) "
                "starts afresh")
        row = {"epoch": epoch, **{k: round(v, 6) for k, v in logs.items()}}
        row.update(_check_guard(guard, config, epoch, stage_dir))
        if config.lr_schedule != "constant":  # the rate the next step would take
            row["learning_rate"] = float(model.optimizer.learning_rate)
        started = time.time()
        row["test_accuracy"] = round(test_accuracy(predict, test_ds), 6)
        if epoch == config.epochs:
            row["test_accuracy_full"] = round(test_accuracy(predict, examples.dataset("test")), 6)
        row["test_seconds"] = round(time.time() - started, 2)
        started = time.time()
        row.update(_watch(monitor))
        row["monitor_seconds"] = round(time.time() - started, 2)
        # The epoch's profile: its steps against its own median step, what watching costs.
        row["steps"] = steps
        row["train_seconds"] = round(train_seconds, 2)
        row["step_ms_median"] = round(1000 * float(np.median(step_seconds)), 2) \
            if step_seconds else 0.0
        if not chief:
            continue
        best = state["best_loss"] is None or logs["loss"] < state["best_loss"]
        started = time.time()
        state["checkpoints"] = _stage_checkpoints(model, stage_dir, best,
                                                  state.get("checkpoints", {}))
        row["checkpoint_seconds"] = round(time.time() - started, 2)
        row["seconds"] = round(time.time() - start, 2)
        logging.info("train: epoch %d: %s", epoch, row)
        if best:
            state["best_loss"], state["best_epoch"] = logs["loss"], epoch
        with writer.as_default(step=epoch):
            for k, v in row.items():
                if k != "epoch":
                    tf.summary.scalar(k, v)
        writer.flush()
        state["history"] = [r for r in state["history"] if r["epoch"] < epoch] + [row]
        state["epoch"] = epoch
        _write_history(stage_dir / HISTORY, state["history"])
        trained.write_state(state)  # commits the epoch, its checkpoints by their sha256
        _settle_checkpoints(stage_dir, state["checkpoints"])
        faults.point("train.epoch_done")
    return list(TrainedModel.OUTPUTS)

