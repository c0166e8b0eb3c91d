"""Train: TFRecords -> SDIM (or the discriminative baseline) under a tf.distribute strategy.

The paper evaluates the checkpoint of least training loss: later stages use
`checkpoints/best.keras`; a killed run resumes from its last committed epoch
(pipeline.checkpoints). One custom loop over `model.train_step` serves every strategy (Keras 3
`fit` under MultiWorkerMirroredStrategy has an open bug, keras-team/keras#20585).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import sdim_tf
from pipeline import artifacts, checkpoints, console, faults, selection, summary
from pipeline.checkpoints import TrainingError
from pipeline.config import ModelConfig, TrainConfig
from pipeline.run_dir import TrainedModel
from sdim_tf import (
    conformal,
    data,
    monitoring,
    outlier_proxies,
    overfitting_guard,
    precision,
    precision_probe,
    robust,
)

# Per-epoch watching, within ~5% of an epoch (history.csv: test_seconds, monitor_seconds):
# test accuracy on the first TEST_SUBSET test images (all of them after the last epoch), and
# the deployed-style rejection quality (sdim_tf.monitoring) on held-out images.
TEST_SUBSET = 1000
MONITOR_FIT, MONITOR_HELD_OUT, MONITOR_OUTLIERS = 2000, 1000, 250
# With adversarial training: FGSM and PGD-10 accuracy on the first GUARD_IMAGES held-out
# images each epoch (sdim_tf.overfitting_guard), about 2% of an MNIST epoch.
GUARD_IMAGES, GUARD_COLUMNS = 256, ("robust/fgsm_accuracy", "robust/pgd_accuracy")
PROBE_BATCHES = 4  # the speed probe cycles through this many batches of the training images


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


def learning_rate(training: TrainConfig, steps_per_epoch: int | None):
    """Adam's learning rate: the constant, or a cosine decay from it to 0 over the run's
    steps (the optimizer's step count, checkpointed with it, carries it across resumes)."""
    if training.lr_schedule == "constant" or training.epochs == 0:  # 0: never a step
        return training.learning_rate
    if not steps_per_epoch:
        raise ValueError(f"--lr_schedule={training.lr_schedule} needs the steps per epoch")
    return keras.optimizers.schedules.CosineDecay(
        training.learning_rate, decay_steps=max(training.epochs * steps_per_epoch, 1))


def build_model(config: ModelConfig, training: TrainConfig, num_classes: int, channels: int,
                steps_per_epoch: int | None = None) -> keras.Model:
    """The model a config asks for, compiled with Adam (`learning_rate`) and XLA off."""
    input_shape = (data.IMAGE_SIZE, data.IMAGE_SIZE, channels)
    if config.model == "sdim":
        model = sdim_tf.SDIM(
            num_classes, input_shape, n=config.n, rep_dim=config.rep_dim,
            critic=config.critic, alpha=config.alpha, beta=config.beta, gamma=config.gamma,
            margin=config.margin, mi_bound=config.mi_bound,
            log_scale_floor=config.log_scale_floor, outlier_weight=config.outlier_weight,
            outlier_margin=config.outlier_margin, robust=config.robust.to_config())
    else:
        model = sdim_tf.DiscriminativeClassifier(num_classes, input_shape, n=config.n)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(training, steps_per_epoch)))
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


def distribute_options() -> tf.data.Options:
    """Each worker reads its share of every batch (the files may be fewer than workers)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = \
        tf.data.experimental.AutoShardPolicy.DATA
    return options


def epoch_dataset(examples, training: TrainConfig, trained_images: dict, batch: int,
                  epoch: int) -> tf.data.Dataset:
    """Epoch `epoch`'s training batches: the selected images in a new shuffled order, augmented
    with the epoch's seed, each worker reading its share."""
    return examples.dataset(
        "train", **trained_images, batch_size=batch, training=True,
        seed=training.seed * 100_003 + epoch).with_options(distribute_options())


def run_epoch(step, model, strategy, dataset, steps: int, progress: str | None = None,
              step_seconds: list | None = None) -> dict:
    """`steps` global batches through `step` (from make_train_step); the epoch's metrics.
    `progress`: the label of a console.Progress over the steps (None: no progress). Each
    step's wall time is appended to `step_seconds` (reading the metrics waits for it)."""
    for metric in model.metrics:
        metric.reset_state()
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    logs = {}
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(console.Progress(progress, steps)) if progress else None
        for i in range(steps):
            started = time.perf_counter()
            logs = {k: float(v) for k, v in step(iterator).items()}
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - started)
            if bar is not None:
                bar.update(i + 1, **{k: logs[k] for k in ("loss", "accuracy") if k in logs})
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


def monitor_data(training: TrainConfig, examples, trained: dict, held_out: dict | None
                 ) -> dict | None:
    """The fixed images `monitoring.rejection_quality` watches each epoch: a trained subset
    for the fit, held-out images (None without any held out) and outliers built from them;
    `trained`, `held_out`: `selection.split_examples`' selections."""
    if held_out is None:
        logging.info("train: no held-out images (--validation_split=0): rejection quality "
                     "is not watched")
        return None
    watch = training.watch
    needed = conformal.minimum_samples(watch.budget, watch.confidence)
    if selection.size(held_out) < needed:
        logging.info("train: %d held-out images, fewer than the %d a %g%% budget needs: "
                     "rejection quality is not watched", selection.size(held_out), needed,
                     100 * watch.budget)
        return None
    fit = examples.arrays("train", **selection.first(trained, MONITOR_FIT))
    held_out = examples.arrays("train", **selection.first(held_out, MONITOR_HELD_OUT))
    sources = held_out[0][:MONITOR_OUTLIERS], held_out[1][:MONITOR_OUTLIERS]
    built = outlier_proxies.built_outliers(*sources, seed=training.seed)
    return {"fit": fit, "held_out": held_out, "outliers": built, "budget": watch.budget,
            "layers": (monitoring.layer_set(watch.layers, watch.split),),
            "rule": "conformal", "confidence": watch.confidence}


def collapse(history: list[dict], logs: dict, num_classes: int) -> str | None:
    """Why training diverged though its loss stayed finite, or None: a model that had learned
    (train accuracy >= 0.5, and >= 0.75 for two classes, in some epoch) falling to at most
    twice chance, or halfway back to chance if that is lower (two classes), in this one."""
    if "accuracy" not in logs:
        return None
    chance = 1.0 / num_classes
    best = max(history, key=lambda row: row.get("accuracy", 0.0), default=None)
    if best is None or best.get("accuracy", 0.0) < max(0.5, 1.5 * chance):
        return None
    if logs["accuracy"] > min(2.0 * chance, (chance + best["accuracy"]) / 2):
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


def _guard(settings: robust.RobustTraining, seed: int, model, watched: dict | None,
           history: list[dict]) -> overfitting_guard.OverfittingGuard | None:
    """The catastrophic-overfitting guard of an adversarially trained run with held-out
    images (None otherwise), its history carried over from the epochs already trained."""
    if not settings.enabled or watched is None:
        return None
    images, labels = (a[:GUARD_IMAGES] for a in watched["held_out"])
    guard = overfitting_guard.OverfittingGuard(model, images, labels, settings.epsilon,
                                               seed=seed)
    guard.history = [overfitting_guard.Measurement(*(row[k] for k in GUARD_COLUMNS))
                     for row in history if all(k in row for k in GUARD_COLUMNS)]
    return guard


def _check_guard(guard, settings: robust.RobustTraining, epoch: int) -> tuple[dict, str | None]:
    """This epoch's guard columns and why it collapsed (None if it did not, or if only the
    log is told: under --robust_mode=reject the examples need not be classified). A collapse
    in the first epoch leaves no good checkpoint to end on: TrainingError."""
    if guard is None:
        return {}, None
    measured, why = guard.check()
    columns = dict(zip(GUARD_COLUMNS, (round(measured.fgsm_accuracy, 6),
                                       round(measured.pgd_accuracy, 6)), strict=True))
    if why and not settings.classifies:
        logging.warning("train: epoch %d: %s", epoch, why)
        return columns, None
    if why and epoch == 1:
        raise TrainingError(
            f"catastrophic overfitting in epoch 1 ({why}, epsilon {settings.epsilon:g}), "
            f"before any good checkpoint; train afresh (--force) with {_remedy(settings)}")
    return columns, why


def _remedy(settings: robust.RobustTraining) -> str:
    return ("--robust_attack=pgd, or a smaller --robust_step_size" if settings.attack == "fgsm"
            else "more --robust_steps, or a smaller --robust_step_size")


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    """Trains to --epochs, resuming from `stage_dir` when a compatible run stopped. The dtype
    policy of training is set for training only: later stages compute in float32."""
    with precision.policy():
        return _train(config.model, config.train, TrainedModel(stage_dir), upstream["ingest"])


def _precision(training: TrainConfig, state: dict | None, hardware: precision.Hardware,
               measure: Callable[[], precision_probe.Probe], unmeasured: str | None = None
               ) -> tuple[str, str, dict | None]:
    """(float32 or bfloat16, why, the speed probe's figures or None): a resumed run keeps
    what it started with, on whatever machine it resumes; a new one resolves
    --mixed_precision here (auto: by `measure`, unless `unmeasured` says why not)."""
    if state is not None:
        return (state["precision"], state["precision_reason"] + " (when the run started)",
                state.get("precision_probe"))
    chosen, why, probe = precision_probe.resolve(training.mixed_precision, hardware, measure,
                                                 unmeasured, warn=_warn)
    return chosen, why, probe.to_json() if probe else None


def speed_probe(model_config: ModelConfig, training: TrainConfig, examples, strategy,
                trained_images: dict, batch: int, steps: int, hardware: precision.Hardware,
                cache: precision_probe.ProbeCache | None = None
                ) -> Callable[[], precision_probe.Probe]:
    """The measurement --mixed_precision=auto decides by: the run's model, compiled step,
    strategy and batches (its first training images, augmented), timed in each precision,
    or what `cache` (default: the user's, precision_probe.cache_dir) holds for this machine
    and these settings."""
    jit_compile = precision.jit_compile(training.jit_compile, hardware)
    key = precision_probe.machine_key(hardware) | {
        "model": model_config.flat(keyed_only=True), "batch_size": batch,
        "image_shape": examples.image_shape, "num_classes": examples.num_classes,
        "augmentation": examples.metadata["augmentation"], "jit_compile": jit_compile,
        "deterministic": training.deterministic, "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync}
    cache = cache or precision_probe.ProbeCache(precision_probe.cache_dir())

    @functools.cache
    def batches():
        dataset = examples.dataset(
            "train", **selection.first(trained_images, PROBE_BATCHES * batch), batch_size=batch,
            training=True, seed=training.seed, repeat=True).with_options(distribute_options())
        return iter(strategy.experimental_distribute_dataset(dataset))

    def make_step(_):  # under the precision's global policy (precision_probe.measure)
        with strategy.scope():
            model = _new_model(model_config, training, examples, steps)
        step = make_train_step(model, strategy, jit_compile=jit_compile)
        return lambda: float(step(batches())["loss"])  # reading the loss waits for the step

    def timed() -> precision_probe.Probe:
        logging.info("train: timing the training step in %s (--mixed_precision=auto: %d "
                     "steps each after %d untimed; kept in %s)",
                     " and ".join(precision_probe.PROBED), precision_probe.TIMED_STEPS,
                     precision_probe.WARMUP_STEPS, cache.path(key))
        return precision_probe.measure(make_step, batch)

    return lambda: precision_probe.cached(cache, key, timed, warn=_warn)


def _warn(message: str) -> None:
    logging.warning("train: %s", message)


def _unmeasured(training: TrainConfig, strategy: tf.distribute.Strategy) -> str | None:
    """Why --mixed_precision=auto does not time this run's steps, or None."""
    if training.epochs == 0:
        return "--epochs=0 trains nothing"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return ("under MultiWorkerMirroredStrategy each worker would time its own steps "
                "and could choose differently")
    return None


def _new_model(model_config: ModelConfig, training: TrainConfig, examples, steps: int
               ) -> keras.Model:
    """The run's model as --seed initialises it, whatever the speed probe's models drew."""
    keras.utils.set_random_seed(training.seed)
    return build_model(model_config, training, examples.num_classes, examples.image_shape[-1],
                       steps)


def _resume_hash(model: ModelConfig, training: TrainConfig, examples) -> Callable[..., str]:
    """changes -> the hash a run resumes under: the model and training flags (epochs only
    when the learning rate is scheduled over them) and the ingested examples."""
    ingest = artifacts.input_hashes({"ingest": examples.folder})

    def resume_hash(**changes) -> str:
        changed = dataclasses.replace(training, **changes)
        flat = {**model.flat(keyed_only=True), **changed.flat(keyed_only=True)}
        if changed.lr_schedule == "constant":  # more epochs resume the run
            flat.pop("epochs")
        return artifacts.config_hash(flat | {"ingest": ingest})

    return resume_hash


def _resume(training: TrainConfig, trained: TrainedModel, resume_hash, chief: bool
            ) -> dict | None:
    """The committed state to resume from, else None with the folder cleared."""
    state = checkpoints.resume_state(trained, training, resume_hash)
    if state is None and chief:
        checkpoints.clear(trained.folder)
    (trained.folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    return state


@dataclasses.dataclass
class _Loop:
    """What every epoch uses, built once."""

    training: TrainConfig
    trained: TrainedModel
    examples: object  # run_dir.Examples
    model: keras.Model
    strategy: tf.distribute.Strategy
    state: dict
    chief: bool
    trained_images: dict  # the selection of the training split it trains on
    batch: int
    steps: int
    hardware: precision.Hardware
    robust: robust.RobustTraining
    held_out: dict | None = None

    def __post_init__(self):
        self.test_ds = self.examples.dataset("test", limit=TEST_SUBSET)
        watched = monitor_data(self.training, self.examples, self.trained_images,
                               self.held_out) if self.chief else None
        self.monitor = monitoring.RejectionMonitor(self.model, **watched) if watched else None
        self.predict = class_predictor(self.model)
        self.guard = _guard(self.robust, self.training.seed, self.model, watched,
                            self.state["history"])
        self.step = make_train_step(self.model, self.strategy, jit_compile=precision.jit_compile(
            self.training.jit_compile, self.hardware))
        self.writer = tf.summary.create_file_writer(str(self.trained.folder / "logs" / "train")) \
            if self.chief else None

    def untrained(self) -> None:
        """--epochs=0: the initial weights go through calibrate, evaluate and export as a
        trained model's do, a baseline."""
        logging.warning("train: --epochs=0: the untrained network (seed %d) is the model",
                        self.training.seed)
        self.state["checkpoints"] = checkpoints.stage(self.model, self.trained.folder, True, {})
        checkpoints.commit(self.trained, self.state)

    def fit(self, epoch: int) -> tuple[dict, dict, str | None]:
        """(the epoch's training metrics, its history row so far, why robust accuracy
        collapsed in it or None)."""
        start = time.time()
        train_ds = epoch_dataset(self.examples, self.training, self.trained_images,
                                 self.batch, epoch)
        step_seconds = []
        logs = run_epoch(self.step, self.model, self.strategy, train_ds, self.steps,
                         progress=f"train: epoch {epoch}/{self.training.epochs}",
                         step_seconds=step_seconds)
        train_seconds = time.time() - start
        why = (f"loss {logs.get('loss')}" if not all(math.isfinite(v) for v in logs.values())
               else collapse(self.state["history"], logs, self.examples.num_classes))
        if why:
            raise TrainingError(
                f"training diverged in epoch {epoch} ({why}); the last good checkpoint (epoch "
                f"{self.state['epoch']}) is kept in {self.trained.last_path}; the same command "
                "resumes from it and may diverge again, a lower --learning_rate (or "
                "--outlier_weight) starts afresh")
        row = {"epoch": epoch, **{k: round(v, 6) for k, v in logs.items()}}
        guarded, collapsed = _check_guard(self.guard, self.robust, epoch)
        row.update(guarded)
        if collapsed:
            return logs, row, collapsed
        if self.training.lr_schedule != "constant":  # the rate the next step would take
            row["learning_rate"] = float(self.model.optimizer.learning_rate)
        self.measure(epoch, row)
        # The epoch's profile: its steps against its own median step, what watching costs.
        row["steps"] = self.steps
        row["train_seconds"] = round(train_seconds, 2)
        row["step_ms_median"] = round(1000 * float(np.median(step_seconds)), 2) \
            if step_seconds else 0.0
        return logs, row, None

    def stop_early(self, epoch: int, row: dict, why: str) -> None:
        """Robust accuracy collapsed in `epoch` (`why`): training ends on the epoch before, whose
        checkpoint stays the last (early stopping on held-out robust accuracy, as Rice et
        al. 2020 advise); state.json says so."""
        good = epoch - 1
        logging.warning(
            "train: catastrophic overfitting in epoch %d (%s, epsilon %g): training ends on "
            "epoch %d, the last good checkpoint, which the later stages use; to train all %d "
            "epochs, train afresh (--force) with %s", epoch, why,
            self.robust.epsilon, good, self.training.epochs, _remedy(self.robust))
        self.state["stopped_early"] = {
            "epoch": good, "collapsed_in": epoch, "why": why,
            **{k: row[k] for k in GUARD_COLUMNS}}
        checkpoints.commit(self.trained, self.state)

    def measure(self, epoch: int, row: dict) -> None:
        """Test accuracy (on all test images after the last epoch) and rejection quality."""
        started = time.time()
        row["test_accuracy"] = round(test_accuracy(self.predict, self.test_ds), 6)
        if epoch == self.training.epochs:
            row["test_accuracy_full"] = round(test_accuracy(
                self.predict, self.examples.dataset("test")), 6)
        row["test_seconds"] = round(time.time() - started, 2)
        started = time.time()
        row.update(_watch(self.monitor))
        row["monitor_seconds"] = round(time.time() - started, 2)

    def commit(self, epoch: int, logs: dict, row: dict, start: float) -> None:
        """The epoch's checkpoints, TensorBoard scalars and history, committed."""
        state = self.state
        best = state["best_loss"] is None or logs["loss"] < state["best_loss"]
        started = time.time()
        state["checkpoints"] = checkpoints.stage(self.model, self.trained.folder, best,
                                                 state.get("checkpoints", {}))
        row["checkpoint_seconds"] = round(time.time() - started, 2)
        row["seconds"] = round(time.time() - start, 2)
        logging.info("train: %s", summary.epoch_line(row, self.training.epochs))
        if best:
            state["best_loss"], state["best_epoch"] = logs["loss"], epoch
        with self.writer.as_default(step=epoch):
            for k, v in row.items():
                if k != "epoch":
                    tf.summary.scalar(k, v)
        self.writer.flush()
        state["history"] = [r for r in state["history"] if r["epoch"] < epoch] + [row]
        state["epoch"] = epoch
        checkpoints.commit(self.trained, state)
        faults.point("train.epoch_done")


def _train(model_config: ModelConfig, training: TrainConfig, trained: TrainedModel,
           examples) -> list[str]:
    keras.utils.set_random_seed(training.seed)
    if training.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = make_strategy(training.distribute)
    chief = is_chief(strategy)
    num_examples = examples.num_examples("train")
    trained_images, held_out = selection.split_examples(training, num_examples,
                                                        lambda: examples.labels("train"))
    num_train = selection.size(trained_images)
    batch = training.batch(num_train)
    if batch < training.batch_size:
        logging.warning("train: %d training images, fewer than --batch_size=%d: batches of %d",
                        num_train, training.batch_size, batch)
    steps = num_train // batch
    resume_hash = _resume_hash(model_config, training, examples)
    state = _resume(training, trained, resume_hash, chief)
    hardware = precision.Hardware.detect()
    chosen, why, probe = _precision(training, state, hardware, speed_probe(
        model_config, training, examples, strategy, trained_images, batch, steps, hardware),
        _unmeasured(training, strategy))
    keras.mixed_precision.set_global_policy(precision.POLICIES[chosen])
    logging.info("train: computing in %s (%s)", chosen, why)
    with strategy.scope():
        if state is not None:
            model = checkpoints.load_last(trained, state)
            logging.info("train: resuming after epoch %d of %d", state["epoch"], training.epochs)
        else:
            model = _new_model(model_config, training, examples, steps)
            state = {"resume_hash": resume_hash(), "epoch": 0, "best_loss": None,
                     "best_epoch": None, "history": [], "precision": chosen,
                     "precision_reason": why, "precision_probe": probe}
    state["examples"] = {"trained": TrainedModel.state_examples(trained_images),
                         "held_out": TrainedModel.state_examples(held_out)}
    state["epochs"] = training.epochs  # planned: names the length a scheduled run needs
    if model_config.robust.enabled:
        state["robust"] = model_config.robust.to_config()
    logging.info("train: %s, %s trainable parameters, strategy %s with %d replica(s)",
                 type(model).__name__, f"{model.trainable_parameter_count():,}",
                 type(strategy).__name__, strategy.num_replicas_in_sync)
    loop = _Loop(training, trained, examples, model, strategy, state, chief, trained_images,
                 batch, steps, hardware, model_config.robust, held_out)
    if training.epochs == 0 and chief and state["epoch"] == 0:
        loop.untrained()
    last = training.epochs
    if stopped := state.get("stopped_early"):  # a resumed run that had ended
        logging.info("train: ended on epoch %d after a collapse in epoch %d", stopped["epoch"],
                     stopped["collapsed_in"])
        last = state["epoch"]
    for epoch in range(state["epoch"] + 1, last + 1):
        start = time.time()
        logs, row, collapsed = loop.fit(epoch)
        if collapsed:
            if chief:
                loop.stop_early(epoch, row, collapsed)
            break
        if chief:
            loop.commit(epoch, logs, row, start)
    return list(TrainedModel.OUTPUTS)
