"""Does the deployed guarantee hold on real scores? (sdim_tf.conformal; a measurement, not a test)

For one trained checkpoint: tied Gaussians on the default layers fitted on trained images, the
score of the held-out images (the last 5000 Fashion-MNIST training images) and of both test
sets. Then
1. the default rule (4% at 95% confidence, and on average) calibrated on the 5000 held-out
   images, applied to Fashion-MNIST test and MNIST test (the final measure);
2. the simulation: the held-out and Fashion-MNIST test scores pooled (15,000 in-distribution
   images) as the population; --draws calibration sets of --calibration_size drawn from it,
   each threshold's true rejection rate measured on the rest of the pool.

python -m bench.conformal_check --checkpoint=/work/runs/fm-default/epochs/epoch_10.keras
Writes bench/results/conformal_check.json.
"""

from __future__ import annotations

import os
import pathlib
import sys

import keras
import numpy as np
from absl import app, flags

from bench.machine import machine
from pipeline import artifacts
from sdim_tf import conformal, data, density, rejection

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A .keras checkpoint trained on the first 55,000 "
                    "Fashion-MNIST training images.")
flags.DEFINE_string("data_dir", os.environ.get("SDIM_DATA_DIR"), "Folder of the IDX files.")
flags.DEFINE_integer("fit_images", 10000, "Trained images the tied Gaussians are fitted on.")
flags.DEFINE_float("reject_budget", 0.04, "The reject budget alpha (as pipeline.run's).")
flags.DEFINE_float("confidence", 0.95, "Confidence of the high-probability rule.")
flags.DEFINE_integer("draws", 2000, "Simulated calibration draws.")
flags.DEFINE_integer("calibration_size", 5000, "Held-out images per simulated draw.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"
                               / "conformal_check.json"), "Where the JSON goes.")


def _images(name: str, split: str, rows=slice(None)) -> tuple[np.ndarray, np.ndarray]:
    images, labels = data.load_split(name, split, FLAGS.data_dir)
    return images[rows], labels[rows]


def main(argv):
    del argv
    if not FLAGS.checkpoint:
        sys.exit("error: --checkpoint is required")
    model = keras.models.load_model(FLAGS.checkpoint)
    fit = _images("fashion_mnist", "train", slice(0, 55000, 55000 // FLAGS.fit_images))
    scorer = density.FeatureDensity(model, 10, density.DEFAULT_LAYERS)
    scorer.fit_features((data.preprocess(fit[0][i:i + 500]), fit[1][i:i + 500])
                        for i in range(0, len(fit[1]), 500))
    sets = {"held_out": _images("fashion_mnist", "train", slice(55000, 60000)),
            "fashion_mnist_test": _images("fashion_mnist", "test"),
            "mnist_test": _images("mnist", "test")}
    top = {}
    for name, (images, _) in sets.items():
        scores, _ = rejection.class_scores(scorer, data.image_batches(images))
        top[name] = scores.max(1)
    record = {"command": " ".join(["python -m bench.conformal_check", *sys.argv[1:]]),
              "machine": machine(), "checkpoint": FLAGS.checkpoint, "alpha": FLAGS.reject_budget,
              "confidence": FLAGS.confidence, "deployed": {}}
    for label, confidence in (("high_probability", FLAGS.confidence), ("marginal", None)):
        t = conformal.threshold(top["held_out"], FLAGS.reject_budget, confidence)
        record["deployed"][label] = {
            "order_statistic": conformal.order_statistic(len(top["held_out"]), FLAGS.reject_budget,
                                                         confidence),
            "threshold": t, **{f"{k}_rejected": float((v < t).mean()) for k, v in top.items()}}
    rng = np.random.default_rng(0)
    pool = np.concatenate([top["held_out"], top["fashion_mnist_test"]])
    rates = {"high_probability": [], "marginal": []}
    for _ in range(FLAGS.draws):
        order = rng.permutation(len(pool))
        calibration, rest = pool[order[:FLAGS.calibration_size]], pool[
            order[FLAGS.calibration_size:]]
        for label, confidence in (("high_probability", FLAGS.confidence), ("marginal", None)):
            t = conformal.threshold(calibration, FLAGS.reject_budget, confidence)
            rates[label].append(float((rest < t).mean()))
    record["simulation"] = {
        "pool": int(len(pool)), "calibration_size": FLAGS.calibration_size,
        "draws": FLAGS.draws,
        **{label: {"mean_rate": float(np.mean(r)), "share_over_alpha":
                   float(np.mean(np.array(r) > FLAGS.reject_budget)),
                   "quantiles_5_50_95": np.quantile(r, [0.05, 0.5, 0.95]).tolist()}
           for label, r in rates.items()}}
    artifacts.write_json(FLAGS.out, record)
    print(record["deployed"])
    print(record["simulation"])


if __name__ == "__main__":
    app.run(main)
