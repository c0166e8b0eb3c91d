"""Calibrate: per-class thresholds from the training (or held-out validation) set.

For each class c and percentile p, the p-th percentile of log p(x|y=c) over the correctly
classified samples of class c, without augmentation (paper section 5) -> thresholds.json.
"""

from __future__ import annotations

import pathlib

from absl import logging

from pipeline import artifacts, inference
from sdim_tf import rejection

FIELDS = ("percentiles", "validation_split", "train_limit")
THRESHOLDS = "thresholds.json"


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    meta = inference.metadata(stage_dir.parent)
    skip, limit = config.calibration_examples(meta["splits"]["train"]["num_examples"])
    model = inference.best_model(stage_dir.parent)
    ll, labels = inference.split_log_likelihoods(model, upstream["ingest"], "train", skip, limit)
    calibration = rejection.calibrate(ll, labels, config.percentiles)
    accuracy = float((ll.argmax(1) == labels).mean())
    for p, v in calibration.items():
        empty = [meta["class_names"][c] for c, n in enumerate(v["counts"]) if n == 0]
        if empty:
            logging.warning("calibrate: no correctly classified sample of %s; every prediction "
                            "of it will be rejected", empty)
        logging.info("calibrate: %s percentile thresholds %s", p,
                     [round(float(t), 1) for t in v["thresholds"]])
    artifacts.write_json(stage_dir / THRESHOLDS, {
        "score": "log_likelihood",
        "source": "validation" if config.validation_split else "train",
        "examples": {"skip": skip, "limit": limit, "num_samples": int(len(labels))},
        "accuracy": accuracy,
        "class_names": meta["class_names"],
        "percentiles": rejection.to_json(calibration)})
    return [THRESHOLDS]


def load(run_dir: pathlib.Path) -> dict:
    """{percentile: {"thresholds": np.ndarray [C], "counts": [C]}} of a run."""
    return rejection.from_json(
        artifacts.read_json(pathlib.Path(run_dir) / "calibrate" / THRESHOLDS)["percentiles"])
