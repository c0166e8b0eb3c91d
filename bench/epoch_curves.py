"""Rejection quality of a run's per-epoch checkpoints: does rejection decay with training?

For each checkpoint, `sdim_tf.monitoring.rejection_quality` on held-out Fashion-MNIST (the
last 5000 training images, never trained on) and outliers built from them, for the model's
own log p(x|c) and tied Gaussians on --layer_sets; selection may look at these. As the
final measure only (never for selection): Fashion-MNIST test accuracy, and the share of
MNIST test rejected at the held-out thresholds with its AUROC against Fashion-MNIST test.

python -m bench.epoch_curves --checkpoints='/work/runs/fm-default/epochs/epoch_*.keras' \
    --out=bench/results/epoch_curves_fm-default.json
Writes the JSON after every checkpoint and keeps the finished ones of an earlier run with the
same settings, so rerunning it adds only the new checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from bench.checkpoints import (
    define_data_flags,
    epoch_of,
    finite,
    held_out_data,
    images_of,
    in_epoch_order,
)
from bench.machine import machine
from sdim_tf import density, monitoring, rejection, rules

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "Glob of the per-epoch .keras checkpoints "
                    "(epoch_<k>.keras); measured in epoch order.")
flags.DEFINE_string("out", "bench/results/epoch_curves.json", "Where the JSON goes.")
flags.DEFINE_enum("rule", "conformal", list(rules.names(rejection.UNFAMILIAR)),
                  "The shared threshold: split conformal as deployed, or the budget percentile.")
flags.DEFINE_float("reject_confidence", 0.95, "Confidence of the conformal threshold.")
define_data_flags(held_out_images=5000)
flags.DEFINE_float("reject_budget", 0.04, "The shared threshold's budget: the share of "
                   "held-out-like images it may reject (see --rule).")
flags.DEFINE_integer("limit_checkpoints", 0, "Measure only the first N checkpoints (0: all).")

flags.DEFINE_string("layer_sets", "head;stage3,stage4,head;quad3,stage4,head;quad3,quad4,head;"
                    "quad2,quad3,quad4,head", "Tied-Gaussian scores to measure: layer sets "
                    "separated by ';', layers by ','; a set ending with ',split' is scored "
                    "with split terms (sdim_tf.density).")


def layer_sets() -> tuple[tuple[str, ...], ...]:
    sets = tuple(tuple(s.split(",")) for s in FLAGS.layer_sets.split(";") if s)
    unknown = sorted({name for s in sets for name in s[:len(s) - (s[-1] == density.SPLIT)]}
                     - set(density.LAYERS))
    if unknown or not sets:
        sys.exit(f"error: --layer_sets: unknown layers {unknown}; known: "
                 f"{', '.join(density.LAYERS)}")
    return sets


def summary(entry: dict) -> str:
    """One line: per score, held-out rejection, mean outlier AUROC, MNIST rejection/AUROC."""

    def number(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    parts = [f"epoch {entry['epoch']:3d} ({entry['seconds']:.0f} s)"]
    for name, q in entry["quality"].items():
        if not isinstance(q, dict):
            continue
        final = q["final_measure"]
        parts.append(f"{name.removeprefix('density_')}: acc {number(q['accuracy'], 4)} "
                     f"rej {number(q['rejected'], 3)} "
                     f"out AUROC {number(q['mean_outlier_auroc'], 4)} "
                     f"| test acc {number(final['accuracy'], 4)} "
                     f"MNIST rej {number(final['outlier_rejected']['mnist'], 3)} "
                     f"AUROC {number(final['outlier_auroc']['mnist'], 4)}")
    return "; ".join(parts)


def main(argv):
    del argv
    paths = in_epoch_order(FLAGS.checkpoints, FLAGS.limit_checkpoints)
    sets = layer_sets()
    trained, held = FLAGS.trained_images, FLAGS.held_out_images
    fit, held_out, built = held_out_data()
    test = images_of("fashion_mnist", "test", data_dir=FLAGS.data_dir)
    mnist = images_of("mnist", "test", data_dir=FLAGS.data_dir)[0]

    settings = {"trained_images": trained, "held_out_images": held,
                "fit_images": FLAGS.fit_images, "fit_stride": int(trained // FLAGS.fit_images),
                "outlier_images": FLAGS.outlier_images, "outliers": list(built),
                "seed": FLAGS.seed, "reject_budget": FLAGS.reject_budget,
                "threshold_rule": "shared", "rule": FLAGS.rule,
                "reject_confidence": FLAGS.reject_confidence if FLAGS.rule == "conformal" else None,
                "layer_sets": [list(s) for s in sets]}
    out = pathlib.Path(FLAGS.out)
    done = {}
    if out.exists():
        previous = json.loads(out.read_text())
        if previous.get("settings") == settings:
            done = {e["path"]: e for e in previous.get("checkpoints", [])}
    record = {
        "command": " ".join(["python -m bench.epoch_curves", *sys.argv[1:]]),
        "machine": machine(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__},
        "settings": settings,
        "final_measure": "Each score's `final_measure` (Fashion-MNIST test accuracy and "
                         "rejection; MNIST test rejection at the held-out thresholds and AUROC "
                         "Fashion-MNIST test vs MNIST test) is reported only, never used for "
                         "selection. Everything else uses training/held-out images only.",
        "checkpoints": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        stat = os.stat(path)
        previous = done.get(path)
        if previous and previous.get("bytes") == stat.st_size and previous.get(
                "modified") == stat.st_mtime:
            record["checkpoints"].append(previous)
            print(f"{summary(previous)} (kept from {out})", flush=True)
            continue
        started = time.time()
        model = keras.models.load_model(path, compile=False)
        quality = monitoring.rejection_quality(
            model, fit, held_out, built, FLAGS.reject_budget, sets, FLAGS.batch_size,
            test=test, test_outliers={"mnist": mnist}, rule=FLAGS.rule,
            confidence=FLAGS.reject_confidence or None)
        entry = {"epoch": epoch_of(path), "path": path, "bytes": stat.st_size,
                 "modified": stat.st_mtime, "seconds": round(time.time() - started, 1),
                 "quality": finite(quality)}
        record["checkpoints"].append(entry)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(summary(entry), flush=True)
        del model
        keras.backend.clear_session()
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
