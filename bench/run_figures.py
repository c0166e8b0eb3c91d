"""A finished pipeline run's deployed figures, from its own artifacts (evaluate/report.json,
train/state.json, attack/attack_report.json when the attack stage ran), and the parity check
of one run against the spread of others."""

from __future__ import annotations

import json
import pathlib

# The figures the parity check compares, in percentage points (AUROC x 100).
PARITY_FIGURES = ("test_accuracy", "test_rejected", "mnist_rejected", "mnist_auroc")


def figures(run_dir: str | pathlib.Path) -> dict:
    """The deployed model's figures of a finished run, from its artifacts."""
    run_dir = pathlib.Path(run_dir)
    report_path = run_dir / "evaluate" / "report.json"
    if not report_path.exists():
        raise FileNotFoundError(f"{report_path} is missing: run the evaluate stage first")
    report = json.loads(report_path.read_text())
    state = json.loads((run_dir / "train" / "state.json").read_text())
    deployed = str(report["deployed_percentile"])
    out = {"model": report["model"], "score": report["score"], "epochs": state["epoch"],
           "precision": state.get("precision"), "best_epoch": state.get("best_epoch"),
           "deployed": deployed, "test_accuracy": 100 * report["accuracy"],
           "test_rejected": 100 * report["selective"][deployed]["reject_rate"],
           "accuracy_on_accepted": 100 * report["selective"][deployed]["accuracy_left"]}
    mnist = report["ood"].get("mnist")
    if mnist:
        out["mnist_rejected"] = 100 * mnist["decision_rejection_rate"][deployed]
        # the top class score: named for SDIM's log-likelihoods, or for a discriminative
        # model's outputs (its logits, or the same density's scores)
        top = "max_log_likelihood" if "max_log_likelihood" in mnist["separation"] else "max_logit"
        out["mnist_auroc"] = 100 * mnist["separation"][top]["auroc"]
    for name, ood in report["ood"].items():
        out[f"ood_rejected/{name}"] = 100 * ood["decision_rejection_rate"][deployed]
    both = report.get("deployed")  # both refusals, where the run has an ambiguity threshold
    if both and report.get("min_gap") is not None:
        test = both["test"]
        out.update(test_rejected=100 * test["rejected"],
                   test_ambiguous=100 * test["ambiguous"],
                   accuracy_on_accepted=100 * test["accuracy_on_accepted"])
        for name, ood in both["ood"].items():
            out[f"ood_rejected/{name}"] = 100 * ood["rejected"]
        if "mnist" in both["ood"]:
            out["mnist_rejected"] = out["ood_rejected/mnist"]
    shifts = report.get("shifts")
    if shifts:
        out["clean_silent_error"] = 100 * shifts["clean"]["silent_error"]
        out["shift_mean_silent_error_middle"] = 100 * shifts["mean_silent_error_middle"]
        out["aurc_clean"] = shifts["aurc"]["clean"]
        out["aurc_shifted_middle"] = shifts["aurc"]["shifted_middle"]
    attack_path = run_dir / "attack" / "attack_report.json"
    if attack_path.exists():
        out.update(attack_figures(json.loads(attack_path.read_text())))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def attack_figures(report: dict) -> dict:
    """Per attacked model (the run's own and any baseline): the clean rejection of the attack
    stage's images, undetected success of the adaptive attacks at each budget, CW-accepted,
    and whether each of Carlini et al.'s checks passed (None: not decided), in percent."""
    out = {}
    adaptive = report.get("adaptive", {})
    for model, clean in report.get("clean", {}).items():
        out[f"attack/{model}/clean_rejected"] = 100 * clean["rejected"]
    for name, label in (("pgd_accepted_linf", "pgd_linf"), ("pgd_accepted_l2", "pgd_l2")):
        for model, curve in adaptive.get(name, {}).items():
            for epsilon, share in zip(curve["epsilons"], curve["undetected_success"],
                                      strict=True):
                out[f"attack/{model}/{label}_undetected@{epsilon:g}"] = 100 * share
            if label == "pgd_l2":
                out[f"attack/{model}/pgd_l2_median_distance"] = (
                    curve["median_distance_of_successes"])
    for model, cw in adaptive.get("cw_accepted", {}).items():
        out[f"attack/{model}/cw_accepted_undetected"] = 100 * cw["undetected_success"]
    for check, result in report.get("sanity", {}).items():
        out[f"attack/sanity/{check}"] = result["passed"]
    return out


def parity(by_run: dict, name: str, margin: float) -> dict:
    """For each PARITY_FIGURES figure: the others' [min - margin, max + margin], `name`'s
    value and whether it lies inside."""
    others = [f for run, f in by_run.items() if run != name]
    if name not in by_run or len(others) < 2:
        raise ValueError(f"--parity={name} needs that run and at least two others")
    checks = {}
    for key in PARITY_FIGURES:
        spread = [f[key] for f in others if key in f]
        if key not in by_run[name] or len(spread) < 2:
            continue
        low, high = min(spread) - margin, max(spread) + margin
        value = by_run[name][key]
        checks[key] = {"value": value, "allowed": [round(low, 4), round(high, 4)],
                       "within": bool(low <= value <= high)}
    return {"run": name, "margin_points": margin, "checks": checks,
            "all_within": all(c["within"] for c in checks.values())}
