"""Evaluate: clean accuracy, selective classification and OOD detection -> report.json/.md.

Beside the paper's metrics (Tables 1-3) it reports what a deployment lives with: the share
of OOD inputs the decision rule rejects, and threshold-free separation (AUROC, AUPR, FPR at
95% TPR).

Each finished part (the test scores, each OOD set's, the shift suite's clean images and
each corruption) is kept in parts/, so a killed stage resumes without redoing it.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable

import numpy as np
from absl import logging

from pipeline import artifacts, console, faults
from pipeline.markdown import percent
from pipeline.run_dir import Evaluation, rejecting_classifier
from sdim_tf import data, metrics, ood_data, plots, rejection, shifts

# The evaluation of a discriminative run beside this one (runs/<dataset>-discriminative), an
# optional input: its test accuracy goes in Table 1.
DISCRIMINATIVE = "discriminative/evaluate"
REPORT_JSON, REPORT_MD = Evaluation.REPORT_JSON, Evaluation.REPORT_MD
RISK_COVERAGE_PNG = "risk_coverage.png"
PARTS = "parts"
PART_DONE = "evaluate.part_done"  # the fault point after each part is kept

# The paper's numbers (Tables 1-3), for the report.
PAPER = {
    "accuracy": {"mnist": (99.55, 99.42), "fashion_mnist": (94.58, 94.25),
                 "cifar10": (92.53, 92.35), "svhn_cropped": (95.74, 95.96)},
    # acc. left and reject rate at the 1st, then the 2nd percentile
    "selective": {"mnist": (99.95, 3.02, 99.97, 4.00),
                  "fashion_mnist": (96.45, 4.63, 96.94, 6.60),
                  "cifar10": (96.18, 8.90, 96.60, 10.86),
                  "svhn_cropped": (97.43, 3.99, 98.00, 6.36)},
    "ood": {("fashion_mnist", "mnist"): (99.36, 99.64),
            ("cifar10", "svhn_cropped"): (94.24, 95.81)},
}


def _keeper(parts: artifacts.Parts, settings: dict, prefix: str = ""
            ) -> Callable[[str, Callable[[], dict]], dict[str, np.ndarray]]:
    """keep(name, compute): the arrays of part `prefix + name`, kept by an earlier run under
    these settings, else computed by `compute()` and kept."""

    def keep(name: str, compute: Callable[[], dict]) -> dict[str, np.ndarray]:
        name = prefix + name
        done = parts.get(name, settings)
        if done is not None:
            logging.info("evaluate: %s kept from an earlier run", name)
            return done[1]
        arrays = parts.put(name, settings, {}, compute())[1]
        faults.point(PART_DONE, name)
        return arrays

    return keep


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    examples, trained, calibration = upstream["ingest"], upstream["train"], upstream["calibrate"]
    dataset, seed, shift_images = config.data.dataset, trained.seed, config.evaluate.shift_images
    deployable = rejecting_classifier(examples, trained, calibration)
    percentiles = calibration.percentiles()
    score, deployed = calibration.score, calibration.saved["deployed"]
    parts = artifacts.Parts(stage_dir / PARTS, artifacts.input_hashes(
        {name: upstream[name].folder for name in ("ingest", "train", "calibrate")}))
    keep = _keeper(parts, {"seed": seed})
    test = keep("test", lambda: _scores(deployable, examples.dataset("test")))
    test_scores, test_labels = test["scores"], test["labels"]
    sdim = trained.kind == "sdim"
    kinds = metrics.SDIM_SCORES if sdim else metrics.DISCRIMINATIVE_SCORES
    report = {"dataset": dataset, "model": trained.kind,
              "score": score.name, "score_note": score.report_note,
              "threshold_rule": calibration.saved.get("threshold_rule"),
              "unfamiliar_rule": deployed["rule"],
              "deployed_percentile": deployed["percentile"],
              "guarantee": deployed.get("guarantee"),
              "promises": calibration.promises(), "min_gap": calibration.min_gap(),
              "num_test": int(len(test_labels)),
              "accuracy": float((test_scores.argmax(1) == test_labels).mean()),
              "selective": {str(p): metrics.selective(test_scores, test_labels, v["thresholds"])
                            for p, v in percentiles.items()},
              "ood": {},
              "deployed": {"test": rejection.outcomes(deployable.decide(test_scores), test_labels),
                           "ood": {}}}
    sets, missing = ood_data.ood_sets(dataset, examples.image_shape, config.data.data_dir,
                                      seed)
    report["ood_unavailable"] = missing
    figures = []
    for name, images in sets.items():
        ood_scores = keep(f"ood_{name}", functools.partial(
            _scores, deployable, data.image_batches(images)))["scores"]
        report["ood"][name] = {
            "num": int(len(ood_scores)),
            "classwise_detection_rate": {
                str(p): metrics.classwise_detection_rate(ood_scores, v["thresholds"])
                for p, v in percentiles.items()},
            "decision_rejection_rate": {
                str(p): metrics.decision_rejection_rate(ood_scores, v["thresholds"])
                for p, v in percentiles.items()},
            "separation": metrics.separation(test_scores, ood_scores, kinds)}
        report["deployed"]["ood"][name] = rejection.outcomes(deployable.decide(ood_scores))
        if name in ood_data.OOD_PAIRS.get(dataset, []) or name == "uniform_noise":
            figure, drawn = f"histograms_{name}.png", calibration.deployed()[1]
            plots.class_histograms(test_scores, test_labels, ood_scores, drawn,
                                   examples.class_names, stage_dir / figure, ood_name=name,
                                   score_name=score_axis(score.name),
                                   threshold_name=f"deployed ({deployed['percentile']})")
            figures.append(figure)
            report.setdefault("drawn_thresholds", {})[figure] = rejection.to_json(
                {deployed["percentile"]: {"thresholds": drawn, "counts": []}})
        logging.info("evaluate: %s: decision-rule rejection %s", name,
                     report["ood"][name]["decision_rejection_rate"])
    if shift_images:
        images, labels = examples.arrays("test", limit=shift_images)
        logging.info("evaluate: shift suite, %d corruptions x %d severities on %d test images",
                     len(shifts.CORRUPTIONS), len(shifts.SEVERITIES), len(labels))
        with console.Progress("evaluate: shift suite", 1 + len(shifts.CORRUPTIONS), "part") as bar:
            report["shifts"] = shifts.measure(deployable, images, labels, seed, keep=_keeper(
                parts, {"seed": seed, "images": shift_images, "parameters": shifts.PARAMETERS},
                prefix="shift_"), progress=lambda done, total: bar.update(done))
        plots.risk_coverage(report["shifts"]["risk_coverage"], stage_dir / RISK_COVERAGE_PNG)
        figures.append(RISK_COVERAGE_PNG)
    report["figures"] = figures
    other = upstream.get(DISCRIMINATIVE)
    report["discriminative_accuracy"] = other.report()["accuracy"] if sdim and other and (
        other.folder / REPORT_JSON).exists() else None
    Evaluation(stage_dir).write_report(report)
    artifacts.write_text(stage_dir / REPORT_MD, markdown(report))
    return [REPORT_JSON, REPORT_MD, *figures]


def _scores(deployable, batches) -> dict[str, np.ndarray]:
    """{"scores": class scores, "labels"} over (images, labels) batches."""
    scores, labels = deployable.class_scores(batches)
    return {"scores": scores, "labels": labels}


def score_axis(score: str) -> str:
    """The axis label of the class-c score of `score` (a registry name)."""
    return f"class-c score ({score})"


def _ordinal(p: str) -> str:
    if not p.isdigit():
        return p
    suffix = "th" if 10 <= int(p) % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(
        int(p) % 10, "th")
    return p + suffix


def _thresholds_name(key: str) -> str:
    return (f"the {_ordinal(key)}-percentile thresholds" if key.replace(".", "").isdigit()
            else f"the {key} thresholds")


def _paper_pct(values, index) -> str:
    return f"{values[index]:.2f}%" if values else "—"


def _shift_lines(shifted: dict) -> list[str]:
    severities = shifted["severities"]
    clean = shifted["clean"]

    def cell(v):
        return f"{percent(v['accuracy'])} / {percent(v['rejected'])} / {percent(v['silent_error'])}"

    lines = ["", "## Shifted inputs: correct or rejected, never silently wrong", "",
             f"The first {shifted['images']} test images under label-preserving corruptions "
             "(`sdim_tf.shifts`, parameters in report.json) at severities "
             f"{severities[0]}-{severities[-1]}, with the deployed rule. Each cell: accuracy / "
             "rejected / silent error (accepted and wrong, a share of all images).", "",
             "| corruption | " + " | ".join(f"severity {s}" for s in severities) + " |",
             "|---|" + "---|" * len(severities),
             "| none (clean) | " + " | ".join([cell(clean)] + [""] * (len(severities) - 1))
             + " |"]
    for name, by_severity in shifted["corruptions"].items():
        lines.append(f"| {name} | " + " | ".join(cell(by_severity[str(s)]) for s in severities)
                     + " |")
    aurc = shifted["aurc"]
    lines += ["", f"Risk-coverage area (lower is better): clean {aurc['clean']:.4f}"
              + (f", every corruption at severity {shifts.MIDDLE_SEVERITY} pooled "
                 f"{aurc['shifted_middle']:.4f}; mean silent error at severity "
                 f"{shifts.MIDDLE_SEVERITY}: {percent(shifted['mean_silent_error_middle'])}."
                 if "shifted_middle" in aurc else ".")]
    return lines


def _rule_lines(report: dict) -> list[str]:
    """The deployed refusals in words: the score, the thresholds and what each promises."""
    grouping = {"per_class": "one per predicted class", "shared": "one shared by all "
                "classes"}.get(report.get("threshold_rule"), "per class")
    promises = report.get("promises") or {}
    lines = [f"{report['num_test']} test images. Score ({report.get('score')}): "
             f"{report.get('score_note', '')}", "",
             f"Deployed refusals (the SavedModel's): unfamiliar, a score below the "
             f"{report.get('unfamiliar_rule', 'percentile')} rule's thresholds ({grouping}; "
             f"row {report.get('deployed_percentile')} of Table 2)"
             + (f": it {promises['unfamiliar']}." if promises.get("unfamiliar") else ".")]
    if report.get("min_gap") is not None:
        lines.append(f"Ambiguous: a gap between the two best class scores below "
                     f"{report['min_gap']:.4g}: {promises.get('ambiguous')}.")
    else:
        lines.append("No ambiguity threshold (--max_error=0): no answer is refused as "
                     "ambiguous.")
    lines += ["", "The percentile rows of Table 2 are the paper's (section 5): percentiles of "
              "the score over correctly classified calibration images, "
              + ("per class." if report.get("threshold_rule") != "shared"
                 else "shared by all classes.")]
    return lines


def _outcome_row(name: str, v: dict) -> str:
    accuracy = v.get("accuracy_on_accepted")
    return (f"| {name} | {v['images']} | {percent(v['coverage'])} | "
            f"{'—' if accuracy is None else percent(accuracy)} | {percent(v['silent_error'])} "
            f"| {percent(v['unfamiliar'])} | {percent(v['ambiguous'])} |")


def _deployed_lines(report: dict) -> list[str]:
    deployed = report["deployed"]
    lines = ["", "## The deployed rule: answers given, refusals by reason", "",
             "Coverage: the share of images answered; silent error: answered and wrong, a "
             "share of all images (every answer on an OOD set is wrong).", "",
             "| images | n | coverage | accuracy on accepted | silent error | unfamiliar | "
             "ambiguous |", "|---|---|---|---|---|---|---|",
             _outcome_row("test", deployed["test"])]
    lines += [_outcome_row(name, v) for name, v in deployed["ood"].items()]
    shifted = report.get("shifts")
    if shifted and shifts.MIDDLE_SEVERITY in shifted["severities"]:
        cells = [v[str(shifts.MIDDLE_SEVERITY)] for v in shifted["corruptions"].values()]
        if cells and "unfamiliar" in cells[0]:
            mean = {k: float(np.mean([c[k] for c in cells]))
                    for k in ("rejected", "silent_error", "unfamiliar", "ambiguous")}
            lines.append(f"| shifted, severity {shifts.MIDDLE_SEVERITY} (mean of "
                         f"{len(cells)} corruptions) | {shifted['images']} | "
                         f"{percent(1 - mean['rejected'])} | — | "
                         f"{percent(mean['silent_error'])} | {percent(mean['unfamiliar'])} | "
                         f"{percent(mean['ambiguous'])} |")
    return lines


def markdown(report: dict) -> str:
    ds, model = report["dataset"], report["model"]
    paper_acc = PAPER["accuracy"].get(ds)
    lines = [f"# Evaluation: {ds} ({model})", "", *_rule_lines(report), "",
             "## Table 1: clean test accuracy", "",
             "| model | ours | paper |", "|---|---|---|",
             f"| {model} | {percent(report['accuracy'])} | "
             f"{_paper_pct(paper_acc, 0 if model == 'sdim' else 1)} |"]
    if report.get("discriminative_accuracy") is not None:
        lines.append(f"| discriminative | {percent(report['discriminative_accuracy'])} | "
                     f"{_paper_pct(paper_acc, 1)} |")
    lines += ["", "## Table 2: decision with rejection on the test set", "",
              "Thresholds on the score alone (the gap is not applied here).", "",
              "| thresholds | acc. left | reject rate | paper acc. left | paper reject rate |",
              "|---|---|---|---|---|"]
    paper_sel = PAPER["selective"].get(ds)
    for i, (p, v) in enumerate(report["selective"].items()):
        paper = (f"{paper_sel[2 * i]:.2f}% | {paper_sel[2 * i + 1]:.2f}%"
                 if paper_sel and i < 2 else "— | —")
        lines.append(f"| {p} | {percent(v['accuracy_left'])} | {percent(v['reject_rate'])} "
                     f"| {paper} |")
    if report.get("deployed"):
        lines += _deployed_lines(report)
    percentiles = list(report["selective"])
    first = report.get("deployed_percentile") or percentiles[0]
    kinds = list(next(iter(report["ood"].values()))["separation"]) if report["ood"] else []
    lines += ["", "## Table 3: out-of-distribution inputs", "",
              f"Rejected: the share the deployed rule refuses (thresholds {first}"
              + (" and the gap" if report.get("min_gap") is not None else "") + "). "
              f"AUROC and FPR at 95% TPR need no threshold (positives = test images; the "
              f"{kinds[0] if kinds else ''} of the class scores; other summaries in "
              "report.json).", "",
              "| OOD set | rejected | AUROC | FPR95 | paper (class-wise det. p1 / p2) |",
              "|---|---|---|---|---|"]
    for name, v in report["ood"].items():
        paper = PAPER["ood"].get((ds, name))
        deployed = report.get("deployed", {}).get("ood", {}).get(name)
        rejected = deployed["rejected"] if deployed else v["decision_rejection_rate"][first]
        separation = v["separation"][kinds[0]]
        lines.append(f"| {name} | {percent(rejected)} | {separation['auroc']:.4f} | "
                     f"{percent(separation['fpr_at_95_tpr'])} | "
                     + (" / ".join(f"{x:.2f}%" for x in paper) if paper else "—") + " |")
    lines += ["", "### Table 3b: the paper's class-wise detection", "",
              "For each class c, the share of OOD inputs whose class-c score is below that "
              "class's threshold, averaged over classes (the paper's metric; it counts an "
              "input per class, not by the one decision a user receives).", "",
              "| OOD set | " + " | ".join(percentiles) + " |",
              "|---|" + "---|" * len(percentiles)]
    for name, v in report["ood"].items():
        lines.append(f"| {name} | " + " | ".join(
            percent(v["classwise_detection_rate"][p]) for p in percentiles) + " |")
    for name, why in report.get("ood_unavailable", {}).items():
        lines.append(f"\n{name}: not evaluated ({why.splitlines()[0][:200]}).")
    if report.get("shifts"):
        lines += _shift_lines(report["shifts"])
    lines += ["", "## What this means", ""]
    test = report.get("deployed", {}).get("test")
    if test:
        lines.append(
            f"The deployed rule answers {percent(test['coverage'])} of the test images and "
            f"is right on {percent(test['accuracy_on_accepted'] or 0)} of those; it refuses "
            f"{percent(test['unfamiliar'])} as unfamiliar and {percent(test['ambiguous'])} as "
            "ambiguous.")
    else:
        lines.append(
            f"At {_thresholds_name(first)} the model keeps "
            f"{percent(1 - report['selective'][first]['reject_rate'])} of the test images and "
            f"is right on {percent(report['selective'][first]['accuracy_left'])} of those.")
    for name, v in report["ood"].items():
        deployed = report.get("deployed", {}).get("ood", {}).get(name)
        refused = deployed["rejected"] if deployed else v["decision_rejection_rate"][first]
        lines.append(
            f"Of {v['num']} {name} inputs, the deployed rule refuses {percent(refused)}; the "
            f"paper's class-wise metric says {percent(v['classwise_detection_rate'][first])}.")
    if report.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"
