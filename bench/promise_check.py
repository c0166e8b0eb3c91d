"""Do the deployed promises hold on real scores? (a measurement, not a test)

From a run directory whose calibrate stage ran: the deployed score of its held-out images
(calibrate's own images), then --draws random splits of them into a calibration part
(--calibration_share) and the rest. On each calibration part the run's own rules choose the
thresholds as the calibrate stage does (`rules.calibrate_both`: the unfamiliar rule and, if
the run has one or --max_error is given, the ambiguity rule, each on its half); on the rest
it counts how often each promise held:

- unfamiliar: the share of the rest refused as unfamiliar <= the rule's alpha;
- ambiguous: the error among the answers given (both refusals passed) <= max_error.

Also the risk-coverage curve of the gap on all held-out images the deployed unfamiliar
thresholds accept, with the deployed point (in-sample: these images chose it).

python -m bench.promise_check --run_dir=runs/fashion_mnist-sdim [--max_error=0.05]
Writes bench/results/<machine kind>/promise_check_<label>.json and .png.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
from absl import app, flags

from bench.machine import kind, machine
from pipeline import artifacts
from pipeline.run_dir import Run
from sdim_tf import metrics, plots, rejection, rules

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A run directory whose calibrate stage ran.")
flags.DEFINE_float("max_error", None, "The ambiguity rule's max_error (default: the run's; "
                   "required when the run has no ambiguity threshold).")
flags.DEFINE_integer("draws", 1000, "Random calibration/rest splits.")
flags.DEFINE_float("calibration_share", 0.5, "Share of the held-out images calibrating each "
                   "draw (the rest measure it).")
flags.DEFINE_integer("seed", 0, "Seed of the splits.")
flags.DEFINE_string("label", None, "Name of the result files (default: the run directory's "
                    "name).")
flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                    "Folder of the <machine kind>/ result folders.")


def held(unfamiliar, ambiguity, scores, labels, calibration, rest) -> dict:
    """The rules calibrated on rows `calibration`, measured on rows `rest`; None where the
    calibration rows cannot support a promise (the calibrate stage stops there)."""
    try:
        chosen, gap = rules.calibrate_both(scores[calibration], labels[calibration],
                                           unfamiliar, ambiguity)
    except rules.CalibrationError:
        return None
    min_gap = None if gap is None else float(gap.thresholds)
    outcome = rejection.outcomes(rejection.decide(scores[rest], chosen.thresholds,
                                                  min_gap=min_gap), labels[rest])
    accuracy = outcome["accuracy_on_accepted"]
    return {"unfamiliar": outcome["unfamiliar"], "coverage": outcome["coverage"],
            "error_on_accepted": None if accuracy is None else 1 - accuracy,
            "min_gap": min_gap}


def summary(values, bound: float | None) -> dict:
    values = np.asarray([v for v in values if v is not None], np.float64)
    result = {"mean": float(values.mean()),
              "quantiles_5_50_95": np.quantile(values, [0.05, 0.5, 0.95]).tolist()}
    if bound is not None:
        result.update(bound=bound, held=float(np.mean(values <= bound)))
    return result


def curve(scores, labels, thresholds, min_gap) -> dict:
    """Risk against coverage (shares of all held-out images) of the gap among the images the
    unfamiliar thresholds accept, and the deployed point."""
    decision = rejection.decide(scores, thresholds)
    passed = ~decision.rejected.numpy()
    right = decision.class_ids.numpy() == labels
    rc = metrics.risk_coverage(decision.gap.numpy()[passed], right[passed])
    point = None
    if min_gap is not None:
        chosen = rejection.outcomes(rejection.decide(scores, thresholds, min_gap=min_gap),
                                    labels)
        point = {"coverage": chosen["coverage"],
                 "risk": 1 - (chosen["accuracy_on_accepted"] or 1.0), "min_gap": min_gap}
    grid = np.linspace(0.02, 1.0, 50)
    at = np.minimum(np.searchsorted(rc["coverage"], grid - 1e-12), len(rc["risk"]) - 1)
    share = passed.mean()
    return {"coverage": (grid * share).round(4).tolist(), "risk": rc["risk"][at].tolist(),
            "aurc_of_passed": rc["aurc"], "passed": float(share), "deployed": point}


def main(argv):
    del argv
    if not FLAGS.run_dir:
        sys.exit("error: --run_dir is required")
    run = Run(FLAGS.run_dir)
    calibration = run.calibration
    unfamiliar, ambiguity = calibration.rules()
    if FLAGS.max_error is not None:
        ambiguity = rules.build("ambiguous", {"max_error": FLAGS.max_error,
                                              **({} if ambiguity is None else
                                                 {"confidence": ambiguity.confidence})})
    if ambiguity is None:
        sys.exit("error: the run has no ambiguity threshold; pass --max_error")
    examples = calibration.saved["examples"]
    scores, labels = rejection.class_scores(run.scoring_model(), run.examples.dataset(
        "train", examples["skip"], examples["limit"]))
    rng = np.random.default_rng(FLAGS.seed)
    size = int(round(FLAGS.calibration_share * len(labels)))
    draws = []
    for _ in range(FLAGS.draws):
        order = rng.permutation(len(labels))
        draws.append(held(unfamiliar, ambiguity, scores, labels, order[:size], order[size:]))
    failed = sum(d is None for d in draws)
    draws = [d for d in draws if d is not None]
    if not draws:
        sys.exit(f"error: no draw of {size} calibration images supports {ambiguity}")
    alpha = getattr(unfamiliar, "alpha", None)
    _, thresholds = calibration.deployed()
    min_gap = calibration.min_gap()
    if FLAGS.max_error is not None:  # the point this max_error picks on all held-out images
        everything = np.arange(len(labels))
        picked = held(unfamiliar, ambiguity, scores, labels, everything, everything)
        min_gap = None if picked is None else picked["min_gap"]
    label = FLAGS.label or pathlib.Path(FLAGS.run_dir).resolve().name
    folder = pathlib.Path(FLAGS.out) / kind()
    record = {
        "command": " ".join(["python -m bench.promise_check", *sys.argv[1:]]),
        "machine": machine(), "run_dir": str(pathlib.Path(FLAGS.run_dir).resolve()),
        "train": {k: run.model.state().get(k) for k in ("epoch", "epochs", "best_epoch",
                                                         "examples")},
        "score": calibration.score.name, "held_out_images": int(len(labels)),
        "held_out_accuracy": float((scores.argmax(1) == labels).mean()),
        "rules": {"unfamiliar": repr(unfamiliar), "ambiguous": repr(ambiguity)},
        "draws": FLAGS.draws, "calibration_images": size, "measured_images": len(labels) - size,
        "draws_without_threshold": failed,
        "note": "held: the share of draws whose rate measured on the rest is within the bound; "
                "the rest is finite, so its sampling noise counts against the promise, which "
                "is on the true rate. draws_without_threshold: calibration parts on which a "
                "rule could not keep its promise (calibrate stops there); left out",
        "promises": {
            "unfamiliar": summary([d["unfamiliar"] for d in draws], alpha),
            "ambiguous": summary([d["error_on_accepted"] for d in draws], ambiguity.max_error)},
        "coverage": summary([d["coverage"] for d in draws], None),
        "min_gap": summary([d["min_gap"] for d in draws], None),
        "risk_coverage": curve(scores, labels, thresholds, min_gap)}
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"promise_check_{label}.png"
    rc = record["risk_coverage"]
    point = rc["deployed"]
    plots.risk_coverage(
        {"held-out images passing the unfamiliar threshold, by gap": rc},
        png, points={} if point is None else {
            f"min_gap {point['min_gap']:.3g} (max_error {ambiguity.max_error:g})":
                (point["coverage"], point["risk"])},
        title=f"{label}: {calibration.score.name} score, {len(labels)} held-out images")
    record["figure"] = png.name
    artifacts.write_json(folder / f"promise_check_{label}.json", record)
    print({k: record[k] for k in ("promises", "coverage")})


if __name__ == "__main__":
    app.run(main)
