"""Adaptive PGD-L-inf's step rules against a finished run, on held-out training images it
classifies correctly and accepts: which rule finds the most undetected successes. Chooses
`--attack_accepted_first_step` on held-out data, never on the test set.

    python -m bench.step_rules --run_dir=<run> [--images=200] [--epsilons=0.1,0.3]

Rules: the cosine schedule from each `--first_steps` (a fraction of epsilon), the constant
step 2.5 epsilon / steps, and AutoPGD; one start each. Writes
bench/results/<machine kind>/step_rules_<run folder name>.json.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from bench.machine import machine, results_path
from pipeline import artifacts
from pipeline.run_dir import Run
from sdim_tf import adversarial

FLAGS = flags.FLAGS


def _define_flags() -> None:  # at run time only: tests import this module beside pipeline.run
    flags.DEFINE_string("run_dir", None, "A finished run (train and calibrate).", required=True)
    flags.DEFINE_integer("images", 200, "Held-out images attacked (correct and accepted).")
    flags.DEFINE_list("epsilons", ["0.1", "0.3"], "L-inf budgets.")
    flags.DEFINE_list("first_steps", ["1", "0.25"], "Cosine first steps, fractions of epsilon.")
    flags.DEFINE_integer("steps", 100, "Steps of every rule.")
    flags.DEFINE_string("out", None, "Folder of the <machine kind>/ result folders "
                        "(default bench/results).")


def held_out(run: Run, deployable, count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The first `count` held-out training images the run classifies correctly and accepts
    (of three times as many read), their labels, and how many were read."""
    block = run.model.examples("held_out")  # (skip, limit); per-class choices refused there
    if block is None:
        raise ValueError(f"{run.root} holds out no training images")
    images, labels = run.examples.arrays("train", skip=block[0], limit=min(block[1], 3 * count))
    scores = deployable.model.predict(images, verbose=0)
    kept = (scores.argmax(1) == labels) & ~deployable.decide(scores).rejected.numpy()
    return images[kept][:count], labels[kept][:count], len(labels)


def measure(run: Run) -> dict:
    deployable, calibration = run.deployable(), run.calibration
    images, labels, read = held_out(run, deployable, FLAGS.images)
    model = deployable.model
    rule = adversarial.Acceptance(calibration.deployed()[1], calibration.min_gap())
    rules = {f"cosine, first step {f} epsilon": dict(first_step=float(f))
             for f in FLAGS.first_steps}
    rules["constant 2.5 epsilon / steps"] = dict(schedule="constant")
    figures = {"images": len(labels), "read": read, "undetected_success": {}}
    for epsilon in map(float, FLAGS.epsilons):
        row = {}
        for name, options in [*rules.items(), ("AutoPGD", None)]:
            began = time.perf_counter()
            if options is None:
                curve = adversarial.apgd_accepted_curve(model, images, labels, rule, norm="inf",
                                                        steps=FLAGS.steps, epsilons=(epsilon,))
            else:
                curve = adversarial.pgd_accepted_curve(model, images, labels, rule, norm="inf",
                                                       steps=FLAGS.steps, epsilons=(epsilon,),
                                                       **options)
            row[name] = round(float(curve.shares[0]), 4)
            print(f"epsilon {epsilon} {name}: {100 * row[name]:.1f}% "
                  f"({time.perf_counter() - began:.0f} s)", flush=True)
        figures["undetected_success"][str(epsilon)] = row
    return figures


def main(argv):
    del argv
    run = Run(FLAGS.run_dir)
    record = {"benchmark": "step_rules",
              "command": " ".join(["python -m bench.step_rules", *sys.argv[1:]]),
              "machine": machine(), "versions": artifacts.package_versions(),
              "run": str(run.root), "steps": FLAGS.steps, "figures": measure(run)}
    path = results_path(f"step_rules_{pathlib.Path(FLAGS.run_dir).name}", FLAGS.out)
    artifacts.write_json(path, record)
    print(json.dumps(record["figures"], indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
