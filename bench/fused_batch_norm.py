"""The default SDIM training step with the encoder's batch norms on TensorFlow's fused kernel
(sdim_tf.fused_batch_norm) against keras.layers.BatchNormalization, per precision.

    python -m bench.fused_batch_norm [--rounds=30] [--steps=2] [--precisions=float32,bfloat16]

Every side is built and traced first; then interleaved rounds time each side for --steps
steps on the same cached batches (and, with --inference_calls, a batch of 256 in inference
mode), so load from other processes falls on all alike. The ratio keras / fused is the median
over rounds of each round's ratio, of wall seconds and (`_cpu`) of the process's CPU seconds,
the steadier figure on cores other jobs share. Small --steps and many --rounds keep the two
sides of a pair close in time. Writes bench/results/<machine kind>/fused_batch_norm.json.
"""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from bench import timing, untrained
from bench.machine import machine, results_path
from pipeline import artifacts
from sdim_tf import encoder, precision
from sdim_tf.fused_batch_norm import FusedBatchNormalization

KERNELS = {"keras": keras.layers.BatchNormalization, "fused": FusedBatchNormalization}

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 30, "Interleaved rounds.")
flags.DEFINE_integer("steps", 2, "Timed training steps per side and round.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per side (tracing).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("inference_calls", 4, "Timed inference calls (batch 256) per side and "
                     "round; 0: training only.")
flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Among float32, bfloat16.")
flags.DEFINE_string("out", None, "Where the JSON goes (default bench/results; a folder per "
                    "machine kind under it).")


def _inference_calls(model, images):
    """A function timing `calls` inference calls of `model` on `images` (traced first)."""
    call = tf.function(lambda x: model(x, training=False))
    timing.block(call(images))

    def seconds(calls: int) -> float:
        return sum(timing.call_seconds(call, images, calls))

    return seconds


def _sides(dataset, images) -> dict:
    """name -> timer: `<kernel>_<precision>` training steps and `..._inference` calls, each
    built and traced under its precision's Keras policy."""
    timers = {}
    for name in FLAGS.precisions:
        for kernel, cls in KERNELS.items():
            with precision.policy(precision.POLICIES[name]), encoder.batch_norm_class(cls):
                model = untrained.model()
                timers[f"{kernel}_{name}"] = timing.training_steps(model, dataset, FLAGS.warmup)
                if FLAGS.inference_calls:
                    timers[f"{kernel}_{name}_inference"] = _inference_calls(model, images)
    return timers


def measure() -> dict:
    dataset = timing.random_batches(FLAGS.batch_size)
    images = tf.constant(np.random.default_rng(0).random((256, 32, 32, 1), np.float32))
    timers = _sides(dataset, images)
    training = {k: v for k, v in timers.items() if not k.endswith("_inference")}
    times = timing.interleaved_rounds(training, FLAGS.rounds, FLAGS.steps)
    if FLAGS.inference_calls:
        inference = {k: v for k, v in timers.items() if k.endswith("_inference")}
        times.update(timing.interleaved_rounds(inference, FLAGS.rounds, FLAGS.inference_calls))
    rows = {side: {
        "ms_median": round(1000 * float(np.median(row["step_seconds"])), 1),
        "cpu_ms_median": round(1000 * float(np.median(row["step_cpu_seconds"])), 1),
        "ms_per_round": [round(1000 * s, 1) for s in row["step_seconds"]],
        "cores_used": row["cores_used"]} for side, row in times.items()}
    ratios = {}
    for side in times:
        if side.startswith("fused_"):
            rest = side.removeprefix("fused_")
            for figure, suffix in (("step_seconds", ""), ("step_cpu_seconds", "_cpu")):
                ratios[f"keras_over_fused_{rest}{suffix}"] = round(timing.median_ratio(
                    times[f"keras_{rest}"][figure], times[side][figure]), 3)
    for name, ratio in ratios.items():
        print(f"{name}: {ratio}", flush=True)
    return {"batch_size": FLAGS.batch_size, "inference_batch_size": len(images),
            "rounds": FLAGS.rounds, "steps": FLAGS.steps,
            "inference_calls": FLAGS.inference_calls, "ratios": ratios, "rows": rows}


def main(argv):
    del argv
    figures = measure()
    record = {"benchmark": "fused_batch_norm",
              "command": " ".join(["python -m bench.fused_batch_norm", *sys.argv[1:]]),
              "machine": machine(), "cpu_flags": sorted(precision.cpu_flags()),
              "versions": artifacts.package_versions(), "figures": figures}
    path = results_path("fused_batch_norm", FLAGS.out)
    artifacts.write_json(path, record)
    print(json.dumps(figures["ratios"], indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
