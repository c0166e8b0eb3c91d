"""What adversarial training (`--robust_*`, sdim_tf.robust) costs per training step, against
the standard step, on this machine.

    python -m bench.robust_cost [--rounds=5] [--steps=8] [--precision=auto]

The variants run in interleaved rounds (each round times every variant for --steps steps
on the same cached batches), so load from other processes falls on all of them alike; the
ratio to the standard step is the median over rounds. Targets (the adversarial-training
issue): <= 4x with PGD, <= 2.2x with FGSM. Writes bench/results/<machine kind>/robust_cost.json.
"""

from __future__ import annotations

import json
import sys

import keras
import numpy as np
from absl import app, flags

from bench import timing
from bench.machine import machine, results_path
from pipeline import artifacts
from pipeline.config import PipelineConfig
from pipeline.stages import train
from sdim_tf import precision

# name -> --robust_* flags (epsilon 0.1, MNIST's screening budget, unless given)
VARIANTS = {
    "standard": {},
    "fgsm_beside": dict(robust_epsilon=0.1, robust_attack="fgsm", robust_mode="classify",
                        robust_clean=True),
    "fgsm_in_place": dict(robust_epsilon=0.1, robust_attack="fgsm", robust_mode="classify"),
    "fgsm_both": dict(robust_epsilon=0.1, robust_attack="fgsm"),
    "pgd3_beside": dict(robust_epsilon=0.1, robust_mode="classify", robust_clean=True),
    "pgd3_in_place": dict(robust_epsilon=0.1, robust_mode="classify"),
    "pgd3_both": dict(robust_epsilon=0.1),  # the preset: --robust_epsilon alone
    "pgd5_both": dict(robust_epsilon=0.3, robust_steps=5),  # the epsilon = 0.3 trials
}
TARGETS = {"fgsm": 2.2, "pgd": 4.0}

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", list(VARIANTS), f"Among {', '.join(VARIANTS)}.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_integer("steps", 8, "Timed steps per variant and round.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per variant (tracing).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_enum("precision", "auto", list(precision.PRECISIONS), "As --mixed_precision; "
                  "auto: bfloat16 where the hardware has it natively (not timed).")


def _step(flags_of_variant: dict, dataset):
    config = PipelineConfig.from_flat(dataset="mnist", epochs=0, **flags_of_variant).resolve()
    model = train.build_model(config.model, config.train, num_classes=10, channels=1)
    return timing.training_steps(model, dataset, FLAGS.warmup)


def measure() -> dict:
    chosen, why = precision.resolve(FLAGS.precision, precision.Hardware.detect())
    keras.mixed_precision.set_global_policy(precision.POLICIES[chosen])
    dataset = timing.random_batches(FLAGS.batch_size)
    try:
        steps = {name: _step(VARIANTS[name], dataset) for name in FLAGS.variants}
        seconds = {name: times["step_seconds"] for name, times in timing.interleaved_rounds(
            steps, FLAGS.rounds, FLAGS.steps).items()}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rows = {}
    for name, times in seconds.items():
        row = {"step_ms_median": round(1000 * float(np.median(times)), 1),
               "flags": VARIANTS[name]}
        if "standard" in seconds:
            ratio = timing.median_ratio(times, seconds["standard"])
            row["over_standard"] = round(ratio, 3)
            target = TARGETS.get(VARIANTS[name].get("robust_attack", "pgd")) \
                if VARIANTS[name] else None
            if target:
                row["target"], row["meets_target"] = target, ratio <= target
        rows[name] = row
        print(f"{name}: {row}", flush=True)
    return {"precision": chosen, "precision_reason": why, "batch_size": FLAGS.batch_size,
            "rounds": FLAGS.rounds, "steps": FLAGS.steps, "rows": rows}


def main(argv):
    del argv
    figures = measure()
    record = {"benchmark": "robust_cost",
              "command": " ".join(["python -m bench.robust_cost", *sys.argv[1:]]),
              "machine": machine(), "versions": artifacts.package_versions(),
              "figures": figures}
    path = results_path("robust_cost")
    artifacts.write_json(path, record)
    print(json.dumps(figures["rows"], indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
