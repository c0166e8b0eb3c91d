"""The attack stage's attack_report.md: the paper's tables with the undetected success beside
them, the adaptive curves, the sanity checks and the SavedModel replay."""

from __future__ import annotations

import numpy as np

from pipeline.markdown import percent

REPORT_JSON, REPORT_MD = "attack_report.json", "attack_report.md"
CURVES_PNG, UNDETECTED_PNG = "accuracy_curves.png", "undetected_curves.png"
EXAMPLES_PNG = "adversarial_examples.png"
BUDGETS = "in the model's input space: 32x32 float images in [0, 1]"

# Paper, MNIST then CIFAR10: detection at the 1st and 2nd percentile (Table 5), and for
# CW-L2 also the success rate (Table 7).
PAPER_UNTARGETED = {"deepfool": (98.00, 98.60, 61.10, 64.30), "boundary": (100, 100, 100, 100),
                    "local_search": (99.90, 100, 88.80, 93.10)}
PAPER_CW = {0.0: (100, 100, 84.65, 93.93, 94.80, 70.84),
            500.0: (99.78, 99.78, 76.61, 76.55, 84.07, 61.26),
            1000.0: (90.24, 95.98, 45.56, 47.86, 75.13, 48.86)}
NAMES = {"fgsm": "FGSM", "pgd": "PGD", "deepfool": "DeepFool", "boundary": "Boundary",
         "local_search": "LocalSearch", "cw_l2": "CW-L2",
         "pgd_accepted_linf": "adaptive PGD-L∞", "pgd_accepted_l2": "adaptive PGD-L2",
         "pgd_accepted_linf_doubled": "adaptive PGD-L∞, 2x steps and restarts",
         "apgd_accepted_linf": "adaptive AutoPGD-L∞", "apgd_accepted_l2": "adaptive AutoPGD-L2",
         "pgd_accepted_linf_from_others": "adaptive PGD-L∞ from other classes' images",
         "transfer_accepted": "transfer (adaptive PGD-L∞ on another model)",
         "square_accepted": "Square-L∞ (gradient-free)", "cw_accepted": "adaptive CW-L2"}
GRIDS = {"linf": "L∞", "l2": "L2"}


def _clean_line(report: dict, models=None) -> str:
    """The clean rejection rate, beside every table."""
    cells = [f"{name} rejects {percent(c['rejected'])} of the first {c['images']} test images "
             f"(accuracy {percent(c['accuracy'])}; {c['attackable']} correct and accepted)"
             for name, c in report["clean"].items() if models is None or name in models]
    return "Clean: " + "; ".join(cells) + "."


def undetected_panels(report: dict) -> dict:
    """{panel title: {label: (epsilons, undetected successes)}} for plots.undetected_curves."""
    s, adaptive = report["settings"], report["adaptive"]
    linf, l2 = {}, {}
    panels = {"linf": linf, "l2": l2}
    for model, by_grid in report.get("worst_case", {}).items():
        for grid, v in by_grid.items():
            panels[grid][f"worst case, {model}"] = (v["epsilons"], v["undetected_success"])
    for attack, panel, label in (
            ("pgd_accepted_linf", linf, "adaptive PGD"), ("apgd_accepted_linf", linf, "AutoPGD"),
            ("pgd_accepted_linf_from_others", linf, "PGD from other classes"),
            ("pgd_accepted_l2", l2, "adaptive PGD"), ("apgd_accepted_l2", l2, "AutoPGD")):
        for model, v in adaptive.get(attack, {}).items():
            panel[f"{label}, {model}"] = (v["epsilons"], v["undetected_success"])
    for attack, label in (("pgd_accepted_linf_doubled", "adaptive PGD 2x"),
                          ("transfer_accepted", "transfer"), ("square_accepted", "Square")):
        for model, v in adaptive.get(attack, {}).items():
            linf[f"{label}, {model} ({v['attacked']} images)"] = (v["epsilons"],
                                                                 v["undetected_success"])
    for attack, by_model in report["curves_undetected"].items():
        for model, v in by_model.items():
            linf[f"ART {NAMES[attack]}, {model}"] = (s["epsilons"], v["undetected_success"])
    return {k: v for k, v in (("L∞", linf), ("L2", l2)) if v}


def markdown(report: dict, names) -> str:
    s = report["settings"]
    lines = [f"# Adversarial evaluation: {report['dataset']} ({report['model']}, score "
             f"{report['score']})", "",
             "An adversarial example is *detected* when the deployed rule (equation 9, and the "
             "gap between the two best class scores when an ambiguity threshold is deployed) "
             "rejects it, and an *undetected success* when it is misclassified and accepted "
             "(it passes both thresholds). The "
             "attacked set: the first test images the deployed model classifies correctly "
             "and accepts (the paper: the first 1000 correctly classified test images). "
             f"Budgets ε are {BUDGETS}. The paper's numbers are for MNIST and CIFAR10.", "",
             f"Deployed thresholds: {report['deployed']['percentile']}"
             + (f", min_gap {report['deployed']['min_gap']:.4g}"
                if report["deployed"].get("min_gap") is not None else "") + ". "
             + _clean_line(report), "",
             *_threat_model_lines(report),
             "Settings (every cap): " + ", ".join(f"{k}={v}" for k, v in s.items()), ""]
    lines += _worst_case_lines(report)
    lines += _curve_lines(report)
    lines += _untargeted_lines(report)
    lines += _cw_lines(report, names)
    lines += _adaptive_lines(report)
    lines += _sanity_lines(report)
    lines += _replay_lines(report)
    lines += _first_image_lines(report, names)
    return "\n".join(lines) + "\n"


def _threat_model_lines(report: dict) -> list[str]:
    """What the attacked network was trained against (`sdim_tf.robust`), beside what the
    attacks here test."""
    threat = report.get("threat_model")
    return [f"Threat model of the training: {threat['statement']}", ""] if threat else []


def _worst_case_lines(report: dict) -> list[str]:
    worst = report.get("worst_case", {})
    if not any(worst.values()):
        return []
    lines = ["## Worst case per image: any attack", "",
             "An attacked image counts at a budget ε when any attack that ran found it an "
             "undetected success whose perturbation, as measured, lies within ε (the "
             "attacks' own grids, the minimal attacks and CW by their example's size). "
             "Undetected success (%) of the first attacked images; below it, per attack "
             "(by its set in `sets/`) and of the images it attacked, how many it found, with "
             "those no other attack found in brackets. " + _clean_line(report), ""]
    for model, by_grid in worst.items():
        for grid, v in by_grid.items():
            epsilons = v["epsilons"]
            lines += [f"| {GRIDS[grid]}, {model} | attacked | "
                      + " | ".join(f"ε={e:g}" for e in epsilons) + " |",
                      "|---|---|" + "---|" * len(epsilons),
                      f"| **worst case** | {v['images']} | "
                      + " | ".join(f"**{_cell(u)}**" for u in v["undetected_success"]) + " |"]
            for name, a in v["attacks"].items():
                lines.append(f"| {name} | {a['images']} | " + " | ".join(
                    f"{f} ({o})" for f, o in zip(a["found"], a["only"], strict=True)) + " |")
            lines.append("")
    return lines


def _curve_lines(report: dict) -> list[str]:
    if not report["curves"]:
        return []
    s = report["settings"]
    lines = ["## Figures 4 and 5: accuracy under FGSM and PGD-L∞", "",
             f"Accuracy: the first {s['images']} test images (the paper's figure); undetected "
             f"success: the first {s['images']} of the attacked set. PGD with a random start, "
             f"{s['pgd_steps']} steps. " + _clean_line(report), "",
             "| attack | model | measure | " + " | ".join(f"ε={e:g}" for e in s["epsilons"])
             + " |", "|---|---|---|" + "---|" * len(s["epsilons"])]
    for attack, by_model in report["curves"].items():
        for model, accuracies in by_model.items():
            undetected = report["curves_undetected"][attack][model]
            lines.append(f"| {NAMES[attack]} | {model} | accuracy | "
                         + " | ".join(f"{100 * a:.1f}" for a in accuracies) + " |")
            lines.append(f"| {NAMES[attack]} | {model} | undetected success "
                         f"({undetected['attacked']}) | "
                         + " | ".join(_cell(u) for u in undetected["undetected_success"]) + " |")
    return lines + ["", f"![curves]({CURVES_PNG})", ""]


def _cell(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _untargeted_lines(report: dict) -> list[str]:
    if not report["untargeted"]:
        return []
    percentiles = list(report["thresholds"])
    lines = ["## Table 5: untargeted attacks", "", _clean_line(report, [report["model"]]), "",
             "| attack | attacked | success | " + " | ".join(
                 f"detected p{p}" for p in percentiles)
             + " | undetected success | median L2 | seconds | paper MNIST p1 / p2 | "
             "paper CIFAR10 p1 / p2 |",
             "|---|---|---|" + "---|" * len(percentiles) + "---|---|---|---|---|"]
    for attack, v in report["untargeted"].items():
        paper = PAPER_UNTARGETED[attack]
        lines.append(
            f"| {NAMES[attack]} | {v['attacked']} | {percent(v['success_rate'])} | "
            + " | ".join(percent(v["detection_rate"][p]) for p in percentiles)
            + f" | {percent(v['undetected_success'])} | {_round(v['median_l2'])} | {v['seconds']}"
            f" | {paper[0]:.2f}% / {paper[1]:.2f}% | {paper[2]:.2f}% / {paper[3]:.2f}% |")
    return lines + [""]


def _round(x):
    return "—" if x is None else round(x, 3)


def _cw_lines(report: dict, names) -> list[str]:
    if not report["cw_l2"]:
        return []
    s, percentiles = report["settings"], list(report["thresholds"])
    lines = ["## Table 7: targeted CW-L2", "",
             f"The first {s['cw_images']} attacked images, each towards every other class. "
             "Success: the target's score leads by at least κ. κ is on the scale of the "
             f"attacked score: {report['cw_confidences']['rule']}. "
             + _clean_line(report, [report["model"]]), "",
             "| κ | attacks | success | " + " | ".join(f"detected p{p}" for p in percentiles)
             + " | undetected success | seconds | paper MNIST p1 / p2 / success | "
             "paper CIFAR10 |",
             "|---|---|---|" + "---|" * len(percentiles) + "---|---|---|---|"]
    for kappa, v in report["cw_l2"].items():
        paper = PAPER_CW.get(float(kappa)) if report["paper_score"] or float(kappa) == 0 \
            else None
        cells = (f"{paper[0]:.2f}% / {paper[1]:.2f}% / {paper[2]:.2f}% | "
                 f"{paper[3]:.2f}% / {paper[4]:.2f}% / {paper[5]:.2f}%") if paper else "— | —"
        lines.append(f"| {kappa} | {v['attacked']} | {percent(v['success_rate'])} | "
                     + " | ".join(percent(v["detection_rate"][p]) for p in percentiles)
                     + f" | {percent(v['undetected_success'])} | {v['seconds']} | {cells} |")
    lines += ["", "### Table 6: the first image's target scores (— = failed)", "",
              "| κ | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for kappa, v in report["cw_l2"].items():
        row = v["first_image_target_scores"]
        lines.append(f"| {kappa} | " + " | ".join(
            "·" if n not in row else ("—" if row[n] is None else f"{row[n]:.1f}")
            for n in names) + " |")
    return lines + [""]


def _adaptive_lines(report: dict) -> list[str]:
    adaptive = report["adaptive"]
    if not adaptive:
        return []
    lines = ["## Adaptive attacks: the attacker knows the rejection rule", "",
             "PGD and AutoPGD on a margin loss that is zero once a wrong class clears its "
             "threshold and leads (`sdim_tf.adversarial.pgd_accepted`, `apgd_accepted`), per "
             "image the first undetected success; PGD from other classes' images starts "
             "each image at its nearest attacked image of another class, projected into the "
             "ball; Square is their gradient-free counterpart; "
             "the transfer attack crafts on another model and asks ours only for its answer. "
             "Undetected success (%) by ε. Along a grid a success counts at every larger ε "
             "without being attacked again (carried over: how many of each ε's figure). "
             + _clean_line(report), ""]
    for grid, attacks in (("L∞", ("pgd_accepted_linf", "pgd_accepted_linf_doubled",
                                   "apgd_accepted_linf", "pgd_accepted_linf_from_others",
                                   "transfer_accepted", "square_accepted")),
                          ("L2", ("pgd_accepted_l2", "apgd_accepted_l2"))):
        rows = [(a, m, v) for a in attacks for m, v in adaptive.get(a, {}).items()]
        if not rows:
            continue
        epsilons = rows[0][2]["epsilons"]
        lines += [f"| {grid} attack | model | attacked | budget | "
                  + " | ".join(f"ε={e:g}" for e in epsilons)
                  + " | median ‖δ‖ at the first undetected success: all / successes (never)"
                  " | carried over, per ε | seconds |",
                  "|---|---|---|---|" + "---|" * len(epsilons) + "---|---|---|"]
        for attack, model, v in rows:
            schedule = v.get("schedule", "constant")
            budget = (f"{v['queries']} queries" if "queries" in v
                      else f"{v['steps']} steps x {v['restarts']}, "
                      + ("AutoPGD's step sizes" if schedule == "auto" else f"{schedule} steps")
                      + (f", crafted on the {v['source']}" if "source" in v else ""))
            smallest = "—" if "never" not in v else (
                f"{_round(v.get('median_distance'))} / "
                f"{_round(v.get('median_distance_of_successes'))} ({v['never']})")
            lines.append(f"| {NAMES[attack]} | {model} | {v['attacked']} | {budget} | "
                         + " | ".join(_cell(u) for u in v["undetected_success"])
                         + f" | {smallest} | {'/'.join(map(str, v.get('carried_over', [])))}"
                         f" | {v['seconds']} |")
        lines.append("")
    if "cw_accepted" in adaptive:
        lines += ["| adaptive CW-L2 (κ=0) | attacks | target reached and accepted | "
                  "undetected success | median L2 | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {model} | {v['attacked']} | {percent(v['success_rate'])} | "
                  f"{percent(v['undetected_success'])} | {_round(v['median_l2'])} | "
                  f"{v['seconds']} |" for model, v in adaptive["cw_accepted"].items()]
        lines.append("")
    return lines + [f"![undetected]({UNDETECTED_PNG})", ""]


def _sanity_lines(report: dict) -> list[str]:
    if not report["sanity"]:
        return []
    lines = ["## Sanity checks (Carlini et al., \"On Evaluating Adversarial Robustness\")", "",
             "| check | criterion | numbers | result |", "|---|---|---|---|"]
    for name, v in report["sanity"].items():
        numbers = {k: x for k, x in v.items() if k not in ("criterion", "passed")}
        result = "not run" if v["passed"] is None else ("pass" if v["passed"] else "FAIL")
        lines.append(f"| {name} | {v['criterion']} | {_numbers(numbers)} | {result} |")
    return lines + [""]


def _numbers(values: dict) -> str:
    def text(x):
        if isinstance(x, list):
            return "[" + ", ".join(text(e) for e in x) + "]"
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    return "; ".join(f"{k} {text(x)}" for k, x in values.items())


def _replay_lines(report: dict) -> list[str]:
    replay = report["replay"]
    lines = ["## The exported SavedModel on the adversarial images", ""]
    if "skipped" in replay:
        return lines + [f"Skipped: {replay['skipped']}.", ""]
    lines.append(f"A sample of each adversarial set (`sets/`) through `serving_default` of "
                 f"{replay['saved_model']} (plain `tf.saved_model.load`) and the in-memory "
                 f"deployable: {replay['compared']} images compared (an even sample and "
                 f"every undetected success, {replay.get('undetected_compared', 0)} of them), "
                 f"{replay['mismatches']} with another class id or rejection. The attacks "
                 "run on the in-memory model, the same weights and graph: the loaded "
                 "SavedModel gives no input gradient."
                 + ("" if replay["export_is_current"] else " The export predates the current "
                    "train or calibrate stage."))
    return lines + ["", "| set | compared | mismatches | undetected successes compared | "
                    "their mismatches |", "|---|---|---|---|---|"] + [
        f"| {name} | {v['compared']} | {v['mismatches']} | {v.get('undetected_compared', '—')} "
        f"| {v.get('undetected_mismatches', '—')} |" for name, v in replay["sets"].items()] + [""]


def _first_image_lines(report: dict, names) -> list[str]:
    first = report["first_image"]
    lines = [f"## Table 4: scores of the first attacked image ({first['label']}, test index "
             f"{first['index']})", "", "| | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for p, t in report["thresholds"].items():
        lines.append(f"| threshold p{p} | " + " | ".join(f"{x:.1f}" for x in t) + " |")
    for name, sc in first["scores"].items():
        best = int(np.argmax(sc))
        lines.append(f"| {name} | " + " | ".join(
            f"**{x:.1f}**" if c == best else f"{x:.1f}" for c, x in enumerate(sc)) + " |")
    return lines + ["", f"![examples]({EXAMPLES_PNG})"]
