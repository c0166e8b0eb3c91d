"""What the timing benchmarks share: random training batches, a warmed-up training step timed
over N steps, waiting for asynchronous outputs, and the figures made of the times (the same
arithmetic for every side of a comparison)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from pipeline.stages import train


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
