"""Calibrate: the rejection score and its thresholds.

The --score (`sdim_tf.scores`) is fitted on the trained images (no augmentation) if it needs
fitting (feature_density: each layer's covariance shrunk when the images are few,
`density.choose_covariance`, recorded in density_fit), and saves what its scorer needs
(density.npz for feature_density). Then, on the
calibration images (the held-out validation images when --validation_split or
--validation_fraction holds some out, else the trained ones) -> thresholds.json:

- for each percentile p of --percentiles, the p-th percentile of the score over the
  correctly classified calibration images (per class, the paper's section 5, or shared), for
  the reports;
- the deployed refusals (`sdim_tf.rules`): the --unfamiliar_rule's thresholds on the score
  (by default split conformal, at most --reject_budget of new images refused) and, with
  --max_error, the --ambiguity_rule's threshold on the gap between the two best class
  scores (at most --max_error of the accepted answers wrong). With both, each is chosen on
  its half of the held-out images (`rules.calibrate_both`). Both promises are written in
  words and numbers, with the coverage they cost on the held-out images.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from pipeline import console
from pipeline.config import ConfigError
from pipeline.run_dir import Calibration
from sdim_tf import rejection, rules


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    config, trained = config.calibrate, upstream["train"]  # the stage's one section
    examples, calibration = upstream["ingest"], Calibration(stage_dir)
    score = config.scoring()
    selection = trained.selection("trained")
    count = len(selection["indices"]) if "indices" in selection else selection["limit"]
    logging.info("calibrate: fitting the score %s on up to %d training images", score.name,
                 count)
    with console.Progress(f"calibrate: {score.name} fit", count, "image") as bar:
        scorer = score.fit(trained.best(), examples.dataset("train", **selection),
                           progress=bar.update)
    outputs = [Calibration.THRESHOLDS, *score.save(scorer, stage_dir)]
    fit_record = getattr(scorer, "fit_record", None)
    for name, record in (fit_record or {}).items():
        logging.info("calibrate: %s (%d-d): %s covariance%s (%s)", name, record["dimensions"],
                     record["covariance"], f", shrinkage {record['shrinkage']:.3f}"
                     if record["covariance"] == "oas" else "", record["why"])
    # the held-out images when train held some out, else the trained ones (the paper's)
    held_out = trained.selection("held_out")
    selection = held_out or selection
    class_scores, labels = rejection.class_scores(scorer,
                                                  examples.dataset("train", **selection))
    names = examples.class_names
    tables = {p: rules.build("percentile", {"percentile": p, "grouping": config.threshold_rule})
              .calibrate(class_scores, labels, names) for p in sorted(set(config.percentiles))}
    unfamiliar, ambiguity = config.refusal_rules()
    chosen, gap, unsupported = _calibrate(config, class_scores, labels, unfamiliar, ambiguity,
                                          names)
    # the deployed thresholds under their percentile when a table holds the same ones
    key = next((str(p) for p, t in tables.items() if ambiguity is None and np.array_equal(
        t.thresholds, chosen.thresholds)), unfamiliar.name)
    thresholds = {str(p): t for p, t in tables.items()} | {key: chosen}
    for p, t in thresholds.items():
        empty = [names[c] for c, n in enumerate(t.record["counts"]) if n == 0]
        if empty and config.threshold_rule == "per_class":
            logging.warning("calibrate: no calibration sample for %s at %s; every prediction "
                            "of it will be rejected", empty, p)
        logging.info("calibrate: %s thresholds %s", p,
                     [round(float(x), 2) for x in t.thresholds])
    min_gap = None if gap is None else float(gap.thresholds)
    deployed = {"percentile": key, "rule": unfamiliar.name, "grouping": config.threshold_rule,
                "guarantee": chosen.record["promise"] if "alpha" in chosen.record else None,
                "promise": chosen.promise,
                **{k: chosen.record.get(k) for k in ("alpha", "confidence", "n", "asked")},
                "unfamiliar": chosen.record,
                "min_gap": min_gap, "ambiguity": None if gap is None else gap.record,
                "ambiguity_unsupported": unsupported,
                "held_out": coverage(class_scores, labels, chosen.thresholds, min_gap)}
    calibration.write_thresholds({
        "score": score.name, "score_settings": score.settings(),
        "score_description": score.description,
        "density_fit": {"covariance": fit_record} if fit_record else None,
        "threshold_rule": config.threshold_rule,
        "source": "validation" if held_out else "train",
        "examples": {**selection, "num_samples": int(len(labels))},
        "accuracy": float((class_scores.argmax(1) == labels).mean()),
        "rejected": {p: float(rejection.decide(class_scores, t.thresholds).rejected.numpy()
                              .mean()) for p, t in thresholds.items()},
        "class_names": names,
        "deployed": deployed,
        "percentiles": rejection.to_json({p: {"thresholds": t.thresholds,
                                              "counts": t.record["counts"]}
                                          for p, t in thresholds.items()})})
    logging.info("calibrate: deploying %s (%s)%s", key, chosen.promise,
                 "" if gap is None else f" and min_gap {min_gap:.4g} ({gap.promise})")
    return outputs


def _calibrate(config, class_scores, labels, unfamiliar, ambiguity, names):
    """(unfamiliar thresholds, ambiguity threshold or None, why the preset's error promise
    was left out or None). An error promise the held-out images cannot support stops the run
    when --max_error was given; the preset's is left out, with a warning, so that a weak
    model (a short run) still deploys its unfamiliar refusal."""
    try:
        return (*rules.calibrate_both(class_scores, labels, unfamiliar, ambiguity, names), None)
    except rules.CalibrationError as e:  # it names the rule and what would do
        if getattr(e, "refusal", None) != rejection.AMBIGUOUS or config.max_error_required:
            raise ConfigError(f"calibrate: {e} (--validation_split={len(labels)} held-out "
                              "images)") from None
        logging.warning("calibrate: %s; deploying without the ambiguous refusal (no promise "
                        "on the answers; --max_error=R requires one)", e)
        chosen, _ = rules.calibrate_both(class_scores, labels, unfamiliar, None, names)
        return chosen, None, str(e)


def coverage(class_scores, labels, thresholds, min_gap) -> dict:
    """What the deployed refusals cost on the held-out images (which chose them): the
    outcomes (`rejection.outcomes`) with both refusals and with the unfamiliar one alone."""
    both = rejection.outcomes(rejection.decide(class_scores, thresholds, min_gap=min_gap),
                              labels)
    alone = rejection.outcomes(rejection.decide(class_scores, thresholds), labels)
    return {**both, "without_ambiguity": {k: alone[k] for k in (
        "coverage", "accuracy_on_accepted", "silent_error")}}
