"""Watch a deployed model's rejections for drift: `python -m pipeline.monitor`.

    python -m pipeline.monitor --model_dir=runs/fashion_mnist-sdim/saved_models/fashion_mnist \
        [--version=N] [--reject_budget=A] [--shift=2] [--arl0=10000] [--out=monitor.json] \
        PREDICTIONS.csv ...

Reads the `rejected` column of the CSV files (one stream, in argument order, each file's
rows in arrival order: true/false, True/False or 1/0) and runs the CUSUM of
`sdim_tf.drift` per reason of refusal:

- unfamiliar, against the rate the model guarantees: `alpha` of the `deployed` entry of
  `assets/thresholds.json` in the version folder (`--model_dir` is a folder of numbered
  versions, the newest by default, or one version). Every rejected row counts but those
  whose `reason` is ambiguous. `--reject_budget` (the rate the deployment promises, as the
  pipeline's flag of that name) overrides it, and is needed for a model exported without a
  guarantee (pipeline.run --reject_budget=0).
- ambiguous (a model with an ambiguity threshold and a `reason` column): the rows refused
  as ambiguous, against the share of the held-out images the model refused so at
  calibration (`deployed.held_out.ambiguous`; a measured rate, not a promise: its promise
  is on the error among the answers, which needs labels).

Only that asset is read, so a copy of the assets without the SavedModel will do.

The CSV of `pipeline.predict` (path, class_name, score, threshold, margin, rejected, reason)
lists files in sorted path order: arrival order only when the names sort by arrival (e.g.
time stamps). A server's log in arrival order is the intended input.

Prints a summary (requests, rejection rate against alpha, the first alarm and the estimated
change point, the false-alarm design); `--out` writes the same as JSON. Request numbers
count from 1 (the n-th data row of the stream). Exit code 0 whether or not an alarm fired
(read `alarm` in the JSON or "alarm: YES" in the summary); 1 for a usage error.
"""

from __future__ import annotations

# First: as the program, it imports TensorFlow without TensorFlow's start-up lines.
from pipeline import console

# isort: split
import csv
import pathlib
import sys

import numpy as np
from absl import app, flags

from pipeline import artifacts
from pipeline.deployed import DeployedModelError, asset, version_dir
from sdim_tf import drift

FLAGS = flags.FLAGS
TRUE, FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})
# sdim_tf.rejection's reasons, named here so that the monitor imports no TensorFlow
UNFAMILIAR, AMBIGUOUS = "unfamiliar", "ambiguous"


def define_flags(flag_values=flags.FLAGS) -> None:
    # Defined only when run as a program: importing this module (tests, other tools) then
    # registers no flag names, which pipeline.predict shares (--model_dir, --version, --out).
    flags.DEFINE_string("model_dir", None, "Folder of numbered SavedModel versions, or one "
                        "version (only assets/thresholds.json is read).", flag_values=flag_values)
    flags.DEFINE_integer("version", None, "Version to read (default: the newest).",
                         flag_values=flag_values)
    flags.DEFINE_float("reject_budget", None, "The guaranteed rejection rate alpha to watch; "
                       "default: the model's (thresholds.json, deployed.alpha).",
                       flag_values=flag_values)
    flags.DEFINE_float("shift", drift.DEFAULT_SHIFT, "The rise the alarm is tuned to: "
                       "rejection rate shift * alpha.", flag_values=flag_values)
    flags.DEFINE_float("arl0", drift.DEFAULT_ARL0, "Least mean number of requests to a false "
                       "alarm when the rate is alpha.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Also write the summary as JSON to this file.",
                        flag_values=flag_values)
    console.define_flags(flag_values=flag_values)


class MonitorError(ValueError):
    """A usage error: the message is printed as `error: <message>`."""


def guarantee(path: pathlib.Path) -> dict:
    """The deployed entry's promise: {"alpha" (None without a guarantee), "confidence",
    "n", "guarantee" (in words), "ambiguous_rate" (the held-out share refused as ambiguous;
    None without an ambiguity threshold)}."""
    deployed = asset(path, "thresholds.json").get("deployed")
    if not isinstance(deployed, dict):
        raise DeployedModelError(f"{path / 'assets' / 'thresholds.json'}: no \"deployed\" "
                                 "entry; was this model exported by pipeline.run?")
    held_out = deployed.get("held_out") or {}
    return {**{key: deployed.get(key) for key in ("alpha", "confidence", "n", "guarantee")},
            "ambiguous_rate": held_out.get(AMBIGUOUS)
            if deployed.get("min_gap") is not None else None}


def read_rejected(paths: list[str]) -> np.ndarray:
    """The `rejected` flags of the CSV files, in order, as one bool array."""
    return read_stream(paths)[0]


def read_stream(paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(the `rejected` flags, the `reason` of each row or None when a file has no such
    column) of the CSV files, in order."""
    flags_read: list[bool] = []
    reasons: list[str] | None = []
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                columns = [c.strip() for c in reader.fieldnames or []]
                if "rejected" not in columns:
                    raise MonitorError(f"{path}: no `rejected` column (columns: "
                                       f"{', '.join(columns) or 'none'})")
                reader.fieldnames = columns
                if "reason" not in columns:
                    reasons = None
                for row in reader:
                    if row["rejected"] is None:
                        raise MonitorError(f"{path}, line {reader.line_num}: fewer fields "
                                           "than the header, no `rejected` value")
                    value = row["rejected"].strip().lower()
                    if value in TRUE:
                        flags_read.append(True)
                    elif value in FALSE:
                        flags_read.append(False)
                    else:
                        raise MonitorError(
                            f"{path}, line {reader.line_num}: rejected={row['rejected']!r}; "
                            "expected true/false, True/False or 1/0")
                    if reasons is not None:
                        reasons.append((row["reason"] or "").strip())
        except OSError as e:
            raise MonitorError(f"{path}: cannot read ({e.strerror or e})") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise MonitorError(f"{path}: not a readable CSV ({e})") from None
    if not flags_read:
        raise MonitorError(f"{', '.join(paths)}: no rows, no request to watch")
    return np.array(flags_read, bool), None if reasons is None else np.array(reasons)


def monitor(rejected: np.ndarray, alpha: float, shift: float = drift.DEFAULT_SHIFT,
            arl0: float = drift.DEFAULT_ARL0) -> dict:
    """The stream through the CUSUM: the report, JSON-ready, request numbers from 1."""
    result = drift.scan(rejected, alpha, shift, arl0)
    cusum = result.cusum
    lower, estimate = cusum.in_control_run_length()

    def alarm(a: drift.Alarm) -> dict:
        return {"request": a.index + 1, "change_request": a.change_point + 1,
                "requests_since_change": a.requests_since_change,
                "rejections_since_change": a.rejections,
                "rate_since_change": a.rate_since_change, "statistic": a.statistic}

    return {
        "requests": result.requests, "rejections": result.rejections,
        "rejection_rate": result.rate, "alpha": cusum.alpha,
        "alarm": bool(result.alarms), "alarms": len(result.alarms),
        "first_alarm": alarm(result.first_alarm) if result.alarms else None,
        "alarm_requests": [a.index + 1 for a in result.alarms],
        "statistic": result.statistic,
        "design": {
            "method": "one-sided Bernoulli CUSUM of the log-likelihood ratio p1 vs p0 "
                      "(sdim_tf.drift); restarts at 0 after each alarm",
            "p0": cusum.alpha, "p1": cusum.p1, "shift": cusum.shift,
            "threshold": cusum.threshold, "arl0_requested": cusum.arl0,
            "arl0_lower_bound": lower, "arl0_estimate": estimate,
            "detection_run_length_at_p1": cusum.detection_run_length()},
    }


def summary(report: dict) -> str:
    """The report as a few lines of text."""
    alpha, design = report["alpha"], report["design"]
    lines = []
    if report.get("model"):
        source = ("--reject_budget" if report["alpha_source"] == "--reject_budget"
                  else "assets/thresholds.json")
        lines.append(f"model: {report['model']} (alpha {100 * alpha:g}% from {source})")
        if report.get("guarantee"):
            lines.append(f"guarantee: {report['guarantee']}")
    else:
        lines.append(f"alpha: {100 * alpha:g}% (--reject_budget)")
    lines.append(f"requests: {report['requests']:,}; rejected {report['rejections']:,} "
                 f"({100 * report['rejection_rate']:.2f}%; guaranteed at most {100 * alpha:g}%)"
                 + (" as unfamiliar" if report.get("ambiguous") else ""))
    first = report["first_alarm"]
    if first:
        lines.append(
            f"alarm: YES, first at request {first['request']:,}; estimated change at request "
            f"{first['change_request']:,} ({first['rejections_since_change']} of "
            f"{first['requests_since_change']:,} rejected since, "
            f"{100 * first['rate_since_change']:.1f}%); {report['alarms']} alarm(s) in all")
    else:
        lines.append("alarm: no")
    lines.append(f"CUSUM now: {report['statistic']:.3f} (alarm at {design['threshold']:.3f})")
    lines.append(
        f"false-alarm design: p1 = {100 * design['p1']:g}% ({design['shift']:g} x alpha), "
        f"h={design['threshold']:.3f}, mean run length to a false alarm >= "
        f"{design['arl0_requested']:,.0f} requests at the guaranteed rate (Markov chain: "
        f"{design['arl0_lower_bound']:,.0f} at least, about {design['arl0_estimate']:,.0f}); "
        f"mean delay to detect a rate of {100 * design['p1']:g}%: at most "
        f"{design['detection_run_length_at_p1']:,.0f} requests")
    ambiguous = report.get("ambiguous")
    if ambiguous:
        first = ambiguous["first_alarm"]
        lines.append(
            f"ambiguous: {ambiguous['rejections']:,} refused "
            f"({100 * ambiguous['rejection_rate']:.2f}%; {100 * ambiguous['alpha']:.2f}% of the "
            f"held-out images at calibration); alarm: "
            + (f"YES, first at request {first['request']:,}" if first else "no"))
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)


def run(model: str | None, version: int | None, alpha: float | None, shift: float,
        arl0: float, csv_paths: list[str]) -> dict:
    """The whole command: the rate to watch, the stream, the report."""
    if not csv_paths:
        raise MonitorError("give the CSV file(s) of rejections (a `rejected` column)")
    if model is None and alpha is None:
        raise MonitorError("--model_dir is required (a folder of SavedModel versions), or give "
                           "the rate to watch with --reject_budget")
    if model is None and version is not None:
        raise MonitorError("--version needs --model_dir")
    promised = {"alpha": None, "confidence": None, "n": None, "guarantee": None,
                "ambiguous_rate": None}
    path = None
    if model is not None:
        path = version_dir(model, version, marker="assets/thresholds.json")
        promised = guarantee(path)
    source = "--reject_budget" if alpha is not None else "model"
    if alpha is None:
        alpha = promised["alpha"]
        if alpha is None:
            raise MonitorError(
                f"{path / 'assets' / 'thresholds.json'}: the deployed thresholds carry no "
                "guarantee (exported with --reject_budget=0), so there is no promised rate to "
                "watch; give one with --reject_budget (e.g. --reject_budget=0.04)")
    rejected, reasons = read_stream(csv_paths)
    ambiguous = None if reasons is None else reasons == AMBIGUOUS
    report = monitor(rejected if ambiguous is None else rejected & ~ambiguous, alpha, shift,
                     arl0)
    report.update(model=str(path) if path else None, csv=list(csv_paths),
                  alpha_source=source, reason=UNFAMILIAR,
                  model_alpha=promised["alpha"], confidence=promised["confidence"],
                  guarantee=promised["guarantee"], ambiguous=None)
    rate = promised["ambiguous_rate"]
    if ambiguous is not None and rate and 0 < rate * shift < 1:
        report["ambiguous"] = {**monitor(ambiguous, rate, shift, arl0),
                               "rate_source": "the held-out images at calibration (measured, "
                                              "not promised)"}
        report["alarm"] = report["alarm"] or report["ambiguous"]["alarm"]
    if source == "model" and promised["confidence"] is None:
        report["note"] = ("the guarantee holds on average over calibration draws: this "
                          "model's own rate may lie slightly above alpha, and false alarms "
                          "then come sooner than designed")
    return report


def main(argv):
    console.setup(FLAGS.verbose)
    try:
        report = run(FLAGS.model_dir, FLAGS.version, FLAGS.reject_budget, FLAGS.shift, FLAGS.arl0,
                     argv[1:])
    except ValueError as e:  # MonitorError, DeployedModelError, drift's checks of the flags
        sys.exit(f"error: {e}")
    print(summary(report))
    if FLAGS.out:
        artifacts.write_json(FLAGS.out, report)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
