"""What a finished run's deployed rule (both refusals) does to outliers built from its
held-out images (a measurement on held-out data, not a test set).

From a run whose calibrate stage ran: the first --outlier_images held-out images (Fashion-MNIST
or MNIST: the last 5000 training images, never trained on) give the proxy outliers (flipped,
inverted, ...) and the part outliers (halves, quadrant mosaics, blends and overlays of two
classes; `sdim_tf.outlier_proxies`). Each set is scored by the run's scoring model and decided
by its deployed rule (`Run.deployable`: the unfamiliar thresholds and, if it has one,
`min_gap`), and reported as the share refused, per reason. The held-out images chose the
thresholds; these outliers did not.

python -m bench.deployed_outliers --run_dir=runs/fashion_mnist-sdim
Writes bench/results/<machine kind>/deployed_outliers_<label>.json.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import app, flags

from bench.checkpoints import images_of
from bench.machine import kind, machine
from pipeline.run_dir import Run
from sdim_tf import data, outlier_proxies, rejection

FLAGS = flags.FLAGS


def _define_flags() -> None:  # at run time only: tests import this module beside pipeline.run
    flags.DEFINE_string("run_dir", None, "A run directory whose calibrate stage ran.")
    flags.DEFINE_integer("outlier_images", 1000, "Held-out images the outliers are built from.")
    flags.DEFINE_integer("seed", 0, "Seed of the outlier construction.")
    flags.DEFINE_string("data_dir", None, "Where the datasets are (default: SDIM_DATA_DIR).")
    flags.DEFINE_string("label", None, "Name of the result file (default: the run directory's "
                        "name).")
    flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                        "Folder of the <machine kind>/ result folders.")


def outlier_sets(run: Run, count: int, seed: int, data_dir: str | None) -> dict:
    """{name: float32 images} built from the run's first `count` held-out images."""
    block = run.model.examples("held_out")  # (skip, limit); per-class choices refused there
    if block is None:
        raise ValueError(f"{run.root} holds out no training images")
    start, limit = block
    if not 0 < count <= limit:
        raise ValueError(f"--outlier_images must be in [1, {limit}], got {count}")
    images, labels = images_of(run.examples.dataset_name, "train",
                               np.arange(start, start + count), data_dir=data_dir)
    return outlier_proxies.built_outliers(images, labels, seed)


def refused(run: Run, sets: dict) -> dict:
    """{name: rejection.outcomes of the deployed rule} for each set of images."""
    deployable = run.deployable()
    return {name: rejection.outcomes(deployable.decide(
                deployable.class_scores(data.image_batches(images))[0]))
            for name, images in sets.items()}


def main(argv):
    del argv
    if not FLAGS.run_dir:
        sys.exit("error: --run_dir is required")
    run = Run(FLAGS.run_dir)
    try:
        sets = outlier_sets(run, FLAGS.outlier_images, FLAGS.seed, FLAGS.data_dir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    outcomes = refused(run, sets)
    for name, o in outcomes.items():
        print(f"{name:>10}: {100 * o['rejected']:.1f}% refused ({100 * o['unfamiliar']:.1f}% "
              f"unfamiliar, {100 * o['ambiguous']:.1f}% ambiguous)")
    label = FLAGS.label or pathlib.Path(FLAGS.run_dir).resolve().name
    out = pathlib.Path(FLAGS.out) / kind() / f"deployed_outliers_{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m bench.deployed_outliers " + " ".join(sys.argv[1:]),
        "run_dir": str(FLAGS.run_dir), "machine": machine(),
        "outlier_images": FLAGS.outlier_images, "seed": FLAGS.seed,
        "min_gap": run.calibration.min_gap(), "sets": outcomes}, indent=2, sort_keys=True))
    print(f"wrote {out}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
