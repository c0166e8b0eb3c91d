"""Calibrate: the rejection score and its per-class thresholds.

With --score=feature_density the tied Gaussians of `sdim_tf.density` are first fitted on the
trained images (no augmentation) -> density.npz. Then, for each class c and percentile p,
the p-th percentile of the score of class c over the correctly classified calibration
samples of class c (paper section 5): the held-out validation images when
--validation_split > 0, else the trained ones -> thresholds.json.
"""

from __future__ import annotations

import pathlib

import keras
from absl import logging

from pipeline.run_dir import Calibration
from sdim_tf import density, rejection

FIELDS = ("percentiles", "validation_split", "train_limit", "score", "density_layers",
          "reject_budget", "export_percentile", "threshold_rule")


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    examples, calibration = upstream["ingest"], Calibration(stage_dir)
    num_train = examples.num_examples("train")
    model = upstream["train"].best()
    outputs = [Calibration.THRESHOLDS]
    if config.score == "feature_density":
        model = fit_density(model, config, examples, num_train)
        calibration.write_density(model.parameters())
        outputs.append(Calibration.DENSITY)
    skip, limit = config.calibration_examples(num_train)
    ll, labels = rejection.class_scores(model, examples.dataset("train", skip, limit))
    percentiles = list(config.percentiles)
    shared = config.threshold_rule == "shared"
    if config.reject_budget:
        deployed = rejection.percentile_key(
            rejection.budget_percentile(ll, labels, config.reject_budget, shared=shared))
        rule = (f"the largest percentile rejecting at most {100 * config.reject_budget:g}% of "
                f"the calibration images")
        if not config.validation_split:
            logging.warning("calibrate: --reject_budget on the trained images underestimates "
                            "the reject rate of new images; use --validation_split")
        percentiles.append(deployed)
    else:
        deployed, rule = config.export_percentile, "--export_percentile"
    calibration_by_p = rejection.calibrate(ll, labels, sorted(set(percentiles)), shared)
    accuracy = float((ll.argmax(1) == labels).mean())
    names = examples.class_names
    for p, v in calibration_by_p.items():
        empty = [names[c] for c, n in enumerate(v["counts"]) if n == 0]
        if empty and not shared:
            logging.warning("calibrate: no correctly classified sample of %s; every prediction "
                            "of it will be rejected", empty)
        elif empty:
            logging.warning("calibrate: no correctly classified sample of %s; the shared "
                            "threshold applies to it all the same", empty)
        logging.info("calibrate: %s percentile thresholds %s", p,
                     [round(float(t), 1) for t in v["thresholds"]])
    key = str(rejection.percentile_key(deployed))
    calibration.write_thresholds({
        "score": config.score,
        "density_layers": list(config.density_layers)
        if config.score == "feature_density" else None,
        "threshold_rule": config.threshold_rule,
        "source": "validation" if config.validation_split else "train",
        "examples": {"skip": skip, "limit": limit, "num_samples": int(len(labels))},
        "accuracy": accuracy,
        "rejected": {str(p): float(rejection.decide(ll, v["thresholds"]).rejected.numpy().mean())
                     for p, v in calibration_by_p.items()},
        "class_names": names,
        "deployed": {"percentile": key, "rule": rule},
        "percentiles": rejection.to_json(calibration_by_p)})
    logging.info("calibrate: deploying the %s percentile (%s)", key, rule)
    return outputs


def fit_density(model, config, examples, num_train: int) -> density.FeatureDensity:
    """--density_layers fitted on the trained images (no augmentation)."""
    skip, limit = config.train_examples(num_train)
    scorer = density.FeatureDensity(model, examples.num_classes, config.density_layers)
    logging.info("calibrate: fitting tied Gaussians on %s over %d training images",
                 ", ".join(config.density_layers), limit)
    bar = keras.utils.Progbar(limit, unit_name="image")
    scorer.fit_features(examples.dataset("train", skip, limit), progress=bar.update)
    return scorer


