"""A run's figures as people read them: the headline (the closing lines of `pipeline.run`,
the top of the run's README) and one line per trained epoch.

Read from the run directory (evaluate/report.json, export/export.json, the train settings,
attack/attack_report.json), so a run whose stages were all skipped as unchanged reports the
same figures.
"""

from __future__ import annotations

import pathlib

from pipeline import artifacts, attack_report, console
from pipeline import run_dir as run_dirs
from pipeline.markdown import percent
from sdim_tf import monitoring, ood_data, rejection, robust, shifts

# The separation kinds (sdim_tf.metrics) that rank by the top class score, as the rule does.
TOP_SCORES = ("max_log_likelihood", "max_logit")


def headline(run_dir: str | pathlib.Path) -> list[tuple[str, str]]:
    """[(figure, value)] of the run's evaluation and export, those that ran."""
    run = run_dirs.Run(run_dir)
    rows = []
    evaluation = run.artifact("evaluate")
    if evaluation.exists():
        rows += _evaluation(evaluation.report())
    if run.model.exists():
        training = robust.RobustTraining.from_settings(run.model.settings)
        if training.enabled:
            how = "FGSM" if training.attack == "fgsm" else f"PGD-{training.iterations}"
            stopped = run.model.state().get("stopped_early")
            ended = (f"; ended on epoch {stopped['epoch']}, robust accuracy collapsed in epoch "
                     f"{stopped['collapsed_in']}" if stopped else "")
            rows.append(("trained against", f"L\u221e \u03b5 = {training.epsilon:g} ({how}, "
                         f"--robust_mode={training.mode}{ended}; docs/robust.md)"))
    attack = run.artifact("attack")
    if attack.exists():
        rows += _attacked(artifacts.read_json(attack.folder / attack_report.REPORT_JSON))
    export = run.artifact("export")
    if export.exists():
        record = export.record()
        rows.append(("SavedModel", f"{record['path']} (version {record['version']})"))
    return rows


def _attacked(report: dict) -> list[tuple[str, str]]:
    """The worst case over the attacks that know the rule, per L\u221e budget (attack stage)."""
    rows = []
    for model, grids in report.get("worst_case", {}).items():
        worst = grids.get("linf")
        if not worst:
            continue
        cells = ", ".join(f"{percent(u)} at {e:g}" for e, u in
                          zip(worst["epsilons"], worst["undetected_success"], strict=True))
        rows.append((f"attacker who knows the rule ({model})",
                     f"accepted and wrong: {cells} (L\u221e \u03b5, worst case over "
                     f"{len(worst['attacks'])} attack(s), {worst['images']} test images)"))
    return rows


def _evaluation(report: dict) -> list[tuple[str, str]]:
    deployed = str(report["deployed_percentile"])
    # what the SavedModel does (both refusals), else the deployed thresholds' Table 2 row
    test = report.get("deployed", {}).get("test") or _outcomes(report["selective"][deployed])
    rows = [("test accuracy", f"{percent(report['accuracy'])} of {report['num_test']} test "
                              "images"),
            ("test images rejected", percent(test["rejected"])
             + (f" ({percent(test['ambiguous'])} as ambiguous)" if test.get("ambiguous")
                else "")),
            ("right among the accepted", percent(test["accuracy_on_accepted"])),
            ("silent error", f"{percent(test['silent_error'])} (accepted and wrong, a share of "
                             "all test images)")]
    promises = report.get("promises") or {rejection.UNFAMILIAR: report.get("guarantee")}
    rows += [("promise" if reason == rejection.UNFAMILIAR else f"promise ({reason})",
              promises[reason]) for reason in (rejection.UNFAMILIAR, rejection.AMBIGUOUS)
             if promises.get(reason)]
    paired = ood_data.OOD_PAIRS.get(report["dataset"], [])
    others = []
    for name, ood in report["ood"].items():
        refused = report.get("deployed", {}).get("ood", {}).get(name)
        rejected = percent(refused["rejected"] if refused
                           else ood["decision_rejection_rate"][deployed])
        if name in paired:
            rows.append((f"{name} rejected / AUROC", f"{rejected} / {_auroc(ood):.4f} "
                                                     f"({ood['num']} images never seen)"))
        else:
            others.append(f"{name} {rejected}")
    if others:
        rows.append(("other outliers rejected", ", ".join(others)))
    shifted = report.get("shifts")
    if shifted and "mean_silent_error_middle" in shifted:
        rows.append(("silent error, corrupted", f"{percent(shifted['mean_silent_error_middle'])} "
                     f"({len(shifted['corruptions'])} corruptions at severity "
                     f"{shifts.MIDDLE_SEVERITY}, first {shifted['images']} test images)"))
    return rows


def _outcomes(selective: dict) -> dict:
    """Table 2's row (accuracy left, reject rate) as `rejection.outcomes` names them."""
    return {"rejected": selective["reject_rate"],
            "accuracy_on_accepted": selective["accuracy_left"],
            "silent_error": (1 - selective["reject_rate"]) * (1 - selective["accuracy_left"])}


def _auroc(ood: dict) -> float:
    """The AUROC of the deployed rule's score: the top class score."""
    separation = ood["separation"]
    kind = next((k for k in TOP_SCORES if k in separation), next(iter(separation)))
    return separation[kind]["auroc"]


def text(rows: list[tuple[str, str]]) -> str:
    """The rows as aligned console lines."""
    width = max((len(figure) for figure, _ in rows), default=0)
    return "\n".join(f"  {figure:<{width}}  {value}" for figure, value in rows)


def markdown(rows: list[tuple[str, str]]) -> list[str]:
    """The rows as a markdown table."""
    return ["| figure | value |", "|---|---|", *[f"| {f} | {v} |" for f, v in rows]]


def epoch_line(row: dict, epochs: int) -> str:
    """One history row as the console shows it: "epoch 3/50  loss 12.3  acc 91.2%  test
    90.8%  held-out rejected 4.1%  outliers rejected 97.0%  2 min 07 s". acc and test are the
    network's own classifier (test: the first 1000 test images, all of them after
    the last epoch); the rejection figures are those of the watched density (else the
    model's score) on held-out images and the outliers built from them."""
    parts = [f"epoch {int(row['epoch'])}/{epochs}", f"loss {row['loss']:.4g}"]
    if "accuracy" in row:
        parts.append(f"acc {100 * row['accuracy']:.1f}%")
    test = row.get("test_accuracy_full", row.get("test_accuracy"))
    if test is not None:
        parts.append(f"test {100 * test:.1f}%")
    watched = sorted({k.split("/")[1] for k in row if k.startswith("monitor/")},
                     key=lambda score: score == monitoring.MODEL_SCORE)
    if watched:
        prefix = f"monitor/{watched[0]}/"
        parts += [f"held-out rejected {100 * row[prefix + 'rejected']:.1f}%",
                  f"outliers rejected {100 * row[prefix + 'mean_outlier_rejected']:.1f}%"]
    if "seconds" in row:
        parts.append(console.duration(row["seconds"]))
    return "  ".join(parts)
