"""Calibrate: the rejection score and its per-class thresholds.

With --score=feature_density the tied Gaussians of `sdim_tf.density` are first fitted on the
trained images (no augmentation) -> density.npz. Then, for each class c and percentile p,
the p-th percentile of the score of class c over the correctly classified calibration
samples of class c (paper section 5): the held-out validation images when
--validation_split > 0, else the trained ones -> thresholds.json.
"""

from __future__ import annotations

import os
import pathlib

import keras
import numpy as np
from absl import logging

from pipeline import artifacts, inference
from sdim_tf import rejection

FIELDS = ("percentiles", "validation_split", "train_limit", "score", "density_layers",
          "reject_budget", "export_percentile", "threshold_rule")
THRESHOLDS, DENSITY = "thresholds.json", "density.npz"


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    meta = inference.metadata(stage_dir.parent)
    num_train = meta["splits"]["train"]["num_examples"]
    model = inference.best_model(stage_dir.parent)
    outputs = [THRESHOLDS]
    if config.score == "feature_density":
        model = fit_density(model, config, upstream["ingest"], num_train, meta["num_classes"],
                            stage_dir / DENSITY)
        outputs.append(DENSITY)
    skip, limit = config.calibration_examples(num_train)
    ll, labels = inference.split_log_likelihoods(model, upstream["ingest"], "train", skip, limit)
    percentiles = list(config.percentiles)
    shared = config.threshold_rule == "shared"
    if config.reject_budget:
        deployed = rejection.budget_percentile(ll, labels, config.reject_budget, shared=shared)
        deployed = int(deployed) if float(deployed).is_integer() else deployed
        rule = (f"the largest percentile rejecting at most {100 * config.reject_budget:g}% of "
                f"the calibration images")
        if not config.validation_split:
            logging.warning("calibrate: --reject_budget on the trained images underestimates "
                            "the reject rate of new images; use --validation_split")
        percentiles.append(deployed)
    else:
        deployed, rule = config.export_percentile, "--export_percentile"
    calibration = rejection.calibrate(ll, labels, sorted(set(percentiles)), shared)
    accuracy = float((ll.argmax(1) == labels).mean())
    for p, v in calibration.items():
        empty = [meta["class_names"][c] for c, n in enumerate(v["counts"]) if n == 0]
        if empty:
            logging.warning("calibrate: no correctly classified sample of %s; every prediction "
                            "of it will be rejected", empty)
        logging.info("calibrate: %s percentile thresholds %s", p,
                     [round(float(t), 1) for t in v["thresholds"]])
    artifacts.write_json(stage_dir / THRESHOLDS, {
        "score": config.score,
        "density_layers": list(config.density_layers)
        if config.score == "feature_density" else None,
        "threshold_rule": config.threshold_rule,
        "source": "validation" if config.validation_split else "train",
        "examples": {"skip": skip, "limit": limit, "num_samples": int(len(labels))},
        "accuracy": accuracy,
        "rejected": {str(p): float(rejection.decide(ll, v["thresholds"])[1].numpy().mean())
                     for p, v in calibration.items()},
        "class_names": meta["class_names"],
        "deployed": {"percentile": _key(deployed), "rule": rule},
        "percentiles": rejection.to_json(calibration)})
    logging.info("calibrate: deploying the %s percentile (%s)", _key(deployed), rule)
    return outputs


def fit_density(model, config, ingest_dir: pathlib.Path, num_train: int, num_classes: int,
                path: pathlib.Path):
    """Fits --density_layers on the trained images; saves the parameters to `path`."""
    from sdim_tf import density

    skip, limit = config.train_examples(num_train)
    scorer = density.FeatureDensity(model, num_classes, config.density_layers)
    logging.info("calibrate: fitting tied Gaussians on %s over %d training images",
                 ", ".join(config.density_layers), limit)
    bar = keras.utils.Progbar(limit, unit_name="image")
    scorer.fit_features(inference.split_dataset(ingest_dir, "train", skip, limit),
                        progress=bar.update)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **scorer.parameters())
    os.replace(tmp, path)
    return scorer


def _key(p: float) -> str:
    return str(p).removesuffix(".0")


def deployed(run_dir: pathlib.Path) -> tuple[float, np.ndarray]:
    """(percentile, thresholds [C]) that the run deploys."""
    saved = artifacts.read_json(pathlib.Path(run_dir) / "calibrate" / THRESHOLDS)
    key = saved["deployed"]["percentile"]
    (percentile, value), = rejection.from_json({key: saved["percentiles"][key]}).items()
    return percentile, value["thresholds"]


def load(run_dir: pathlib.Path) -> dict:
    """{percentile: {"thresholds": np.ndarray [C], "counts": [C]}} of a run."""
    return rejection.from_json(
        artifacts.read_json(pathlib.Path(run_dir) / "calibrate" / THRESHOLDS)["percentiles"])
