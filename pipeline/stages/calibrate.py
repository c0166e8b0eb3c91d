"""Calibrate: the rejection score and its thresholds.

With --score=feature_density the tied Gaussians of `sdim_tf.density` are first fitted on the
trained images (no augmentation) -> density.npz. Then on the calibration images (the
held-out validation images when --validation_split > 0, else the trained ones) ->
thresholds.json:

- for each percentile p of --percentiles, the p-th percentile of the score over the
  correctly classified calibration images (per class, the paper's section 5, or shared);
- with --reject_budget=alpha (needs held-out images), the deployed thresholds: split
  conformal (`sdim_tf.conformal`) on the top scores of all held-out images, which rejects at
  most alpha of new images drawn like them, with confidence --reject_confidence (0: on
  average). One threshold for all classes, or per predicted class (Mondrian) under
  --threshold_rule=per_class.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from pipeline import console
from pipeline.config import ConfigError
from pipeline.run_dir import Calibration
from sdim_tf import budget_rules, conformal, density, rejection

GUARANTEED = "conformal"  # thresholds.json's key of the guaranteed thresholds


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    config, trained = config.calibrate, upstream["train"]  # the stage's one section
    examples, calibration = upstream["ingest"], Calibration(stage_dir)
    model = trained.best()
    outputs = [Calibration.THRESHOLDS]
    if config.score == "feature_density":
        model = fit_density(model, config, examples, trained.examples("trained"))
        calibration.write_density(model.parameters())
        outputs.append(Calibration.DENSITY)
    # the held-out images when train held some out, else the trained ones (the paper's)
    held_out = trained.examples("held_out")
    skip, limit = held_out or trained.examples("trained")
    ll, labels = rejection.class_scores(model, examples.dataset("train", skip, limit))
    shared = config.threshold_rule == "shared"
    names = examples.class_names
    calibration_by_p = rejection.calibrate(ll, labels, sorted(set(config.percentiles)), shared)
    deployed = {"percentile": str(rejection.percentile_key(config.export_percentile)),
                "rule": "--export_percentile (no guarantee)"}
    if config.reject_budget:
        calibration_by_p[GUARANTEED], deployed = guaranteed(ll, config, names)
    for p, v in calibration_by_p.items():
        empty = [names[c] for c, n in enumerate(v["counts"]) if n == 0]
        if empty and not shared:
            logging.warning("calibrate: no calibration sample for %s at %s; every prediction "
                            "of it will be rejected", empty, p)
        logging.info("calibrate: %s thresholds %s", p,
                     [round(float(t), 2) for t in v["thresholds"]])
    calibration.write_thresholds({
        "score": config.score,
        "density_layers": list(config.density_layers)
        if config.score == "feature_density" else None,
        "density_split": config.density_split if config.score == "feature_density" else None,
        "threshold_rule": config.threshold_rule,
        "source": "validation" if held_out else "train",
        "examples": {"skip": skip, "limit": limit, "num_samples": int(len(labels))},
        "accuracy": float((ll.argmax(1) == labels).mean()),
        "rejected": {str(p): float(rejection.decide(ll, v["thresholds"]).rejected.numpy().mean())
                     for p, v in calibration_by_p.items()},
        "class_names": names,
        "deployed": deployed,
        "percentiles": rejection.to_json(calibration_by_p)})
    logging.info("calibrate: deploying %s (%s)", deployed["percentile"],
                 deployed.get("guarantee", deployed["rule"]))
    return outputs


def guaranteed(ll: np.ndarray, config, names) -> tuple[dict, dict]:
    """Split-conformal thresholds on the held-out top scores (`sdim_tf.budget_rules`):
    ({"thresholds", "counts"}, the thresholds.json "deployed" entry with the promise in
    words)."""
    alpha, confidence = config.reject_budget, config.reject_confidence or None
    per_class = config.threshold_rule == "per_class"  # Mondrian: a guarantee per class
    chosen = budget_rules.budget_thresholds(ll, alpha, rule="conformal", confidence=confidence,
                                            per_class=per_class)
    needed, n = conformal.minimum_samples(alpha, confidence), len(ll)
    if not per_class and n < needed:
        raise ConfigError(f"--reject_budget={alpha:g} needs at least {needed} held-out "
                          f"images for its guarantee; --validation_split={n}")
    few = [f"{names[c]} ({k})" for c, k in enumerate(chosen.counts) if k < needed]
    if per_class and few:
        raise ConfigError(
            f"--threshold_rule=per_class: too few held-out images predicted as {few} for "
            f"a {100 * alpha:g}% guarantee (each class needs {needed}); use "
            "--threshold_rule=shared or a larger --validation_split")
    promise = conformal.promise(alpha, confidence, n)
    if per_class:
        promise += "; for each predicted class"
    return ({"thresholds": chosen.thresholds, "counts": chosen.counts},
            {"percentile": GUARANTEED, "rule": "split conformal on the held-out images' top "
             "scores (sdim_tf.conformal)", "guarantee": promise, "alpha": alpha,
             "confidence": confidence, "n": int(n)})


def fit_density(model, config, examples, trained: tuple[int, int]) -> density.FeatureDensity:
    """--density_layers fitted on the `trained` (skip, limit) images (no augmentation)."""
    skip, limit = trained
    scorer = density.FeatureDensity(model, examples.num_classes, config.density_layers,
                                    config.density_split)
    logging.info("calibrate: fitting tied Gaussians on %s%s over %d training images",
                 ", ".join(config.density_layers), " (split terms)" if config.density_split
                 else "", limit)
    with console.Progress("calibrate: density fit", limit, "image") as bar:
        fitted = scorer.fit_features(examples.dataset("train", skip, limit),
                                     progress=bar.update)
    dims = scorer.density_scores.dims
    thin = [f"{name} ({d}-d)" for name, d in dims.items() if fitted < 2 * d]
    if thin:
        logging.warning("calibrate: %d training images for %s: a shared covariance needs "
                        "several times more images than dimensions, and the scores will "
                        "reject too much; fewer layers (e.g. --density_layers=head) or more "
                        "images", fitted, ", ".join(thin))
    return scorer
