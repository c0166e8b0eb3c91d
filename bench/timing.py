"""What the timing benchmarks share: random training batches, a warmed-up training step timed
over N steps, the default run's real input, waiting for asynchronous outputs, and the figures
made of the times (the same arithmetic for every side of a comparison)."""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from pipeline import selection
from pipeline.config import PipelineConfig
from pipeline.run_dir import Examples
from pipeline.stages import ingest, train


def random_batches(batch_size: int, seed: int = 0) -> tf.data.Dataset:
    """Four cached batches of random 32 x 32 x 1 images in [0, 1) with labels 0-9, repeated:
    a training step timed on them measures compute, not input."""
    rng = np.random.default_rng(seed)
    images = rng.random((4 * batch_size, 32, 32, 1), np.float32)
    labels = rng.integers(0, 10, 4 * batch_size)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(
        batch_size).cache().repeat()


def training_steps(model, dataset: tf.data.Dataset, warmup: int) -> Callable[[int], float]:
    """A function timing `steps` training steps of `model` on `dataset` (seconds, ended by
    reading the loss), after `warmup` untimed steps (tracing, allocation)."""
    step = train.make_train_step(model, tf.distribute.get_strategy())
    iterator = iter(dataset)
    for _ in range(warmup):
        step(iterator)["loss"].numpy()

    def seconds(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            metrics = step(iterator)
        metrics["loss"].numpy()
        return time.perf_counter() - started

    return seconds


def ingested(folder: pathlib.Path) -> Examples:
    """Fashion-MNIST ingested from $SDIM_DATA_DIR into folder/fashion_mnist (once)."""
    examples = Examples(folder / "fashion_mnist")
    if not (examples.folder / Examples.METADATA).exists():
        ingest.ingest("fashion_mnist", examples.folder)
    return examples


def default_training(examples: Examples, batch_size: int) -> tuple[PipelineConfig, dict, int]:
    """The default Fashion-MNIST run at `batch_size`: its resolved config, the training images
    it selects (the held-out ones left out) and its global batch."""
    config = PipelineConfig.from_flat(dataset="fashion_mnist", batch_size=batch_size).resolve()
    trained, _ = selection.split_examples(config.train, examples.num_examples("train"),
                                          lambda: examples.labels("train"))
    return config, trained, config.train.batch(selection.size(trained))


def read_through(dataset: tf.data.Dataset) -> dict:
    """One pass over `dataset`'s (images, labels) batches with nothing else done: the images,
    the seconds, and the first batch's seconds and images (a shuffle buffer fills before it)."""
    started = time.perf_counter()
    count, first = 0, None
    for images, _ in dataset:
        count += int(images.shape[0])
        if first is None:
            first = {"first_batch_seconds": time.perf_counter() - started,
                     "first_batch_images": count}
    return {"images": count, "seconds": time.perf_counter() - started, **(first or {})}


def interleaved_rounds(timers: dict[str, Callable[[int], float]], rounds: int,
                       steps: int) -> dict[str, dict[str, list[float]]]:
    """Each round runs every timer (from `training_steps`) for `steps` steps in turn, so that
    load from other processes falls on all of them alike; every other round in reverse order,
    so that no timer always follows the same one. Per name, each round's seconds per
    step (`step_seconds`), the process's CPU seconds per step (`step_cpu_seconds`) and the
    cores it used (`cores_used`, cpu_and_wall)."""
    times = {name: {"step_seconds": [], "step_cpu_seconds": [], "cores_used": []}
             for name in timers}
    for round_ in range(rounds):
        order = list(timers.items())
        for name, seconds in order[::-1] if round_ % 2 else order:
            with cpu_and_wall() as spent:
                times[name]["step_seconds"].append(seconds(steps) / steps)
            times[name]["step_cpu_seconds"].append(spent["cpu"] / steps)
            times[name]["cores_used"].append(cores_used(spent["cpu"], spent["wall"]))
    return times


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over rounds of each round's ratio (interleaved_rounds' pairs)."""
    return float(np.median(np.asarray(numerators) / np.asarray(denominators)))


def block(outputs) -> None:
    """Waits for every output (the call returns before async kernels finish; numpy outputs,
    as a TF1 session returns, are done already)."""
    for value in tf.nest.flatten(outputs):
        if hasattr(value, "numpy"):
            value.numpy()


def call_seconds(fn: Callable, inputs, calls: int) -> list[float]:
    """Wall seconds of each of `calls` calls of fn(inputs), each waited for."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        block(fn(inputs))
        seconds.append(time.perf_counter() - started)
    return seconds


@contextlib.contextmanager
def cpu_and_wall() -> Iterator[dict]:
    """{"cpu": s, "wall": s} of the block, filled when it ends: the process's CPU seconds
    (all its threads) beside wall seconds, whose ratio (`cores_used`) says how many cores the
    timed code had on cores shared with other jobs."""
    times = {}
    cpu, wall = time.process_time(), time.perf_counter()
    yield times
    times["cpu"], times["wall"] = time.process_time() - cpu, time.perf_counter() - wall


def cores_used(cpu_seconds: float, wall_seconds: float) -> float:
    return round(cpu_seconds / wall_seconds, 2)


def images_per_second(images: int, seconds: float) -> float:
    return round(images / seconds, 1)


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    """The q-th percentile of call times, in milliseconds (numpy's linear interpolation)."""
    return round(1000 * float(np.percentile(seconds, q)), 3)
