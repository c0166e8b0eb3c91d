"""Attack (opt-in): adversarial robustness and detection, paper section 5.3 and appendix D.

FGSM/PGD accuracy curves (Figures 4 and 5, beside a discriminative run when
--attack_baseline names one), untargeted DeepFool, Boundary and LocalSearch (Table 5) and
targeted CW-L2 with confidences (Tables 6 and 7). Each finished attack is kept in parts/,
so a killed stage resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
from absl import logging

from pipeline import artifacts
from pipeline.config import ConfigError
from pipeline.run_dir import Run
from sdim_tf import adversarial, plots

FIELDS = ("attacks", "attack_images", "attack_epsilons", "attack_pgd_steps",
          "attack_pgd_step_size", "attack_deepfool_steps", "attack_boundary_steps",
          "attack_local_search_rounds", "attack_cw_images", "attack_cw_confidences",
          "attack_cw_steps", "attack_cw_search_steps", "attack_baseline", "seed")
REPORT_JSON, REPORT_MD = "attack_report.json", "attack_report.md"
CURVES_PNG, EXAMPLES_PNG, EXAMPLES_NPZ = "accuracy_curves.png", "adversarial_examples.png", \
    "adversarial_examples.npz"
PARTS = "parts"

# Paper, MNIST then CIFAR10: detection at the 1st and 2nd percentile (Table 5), and for
# CW-L2 also the success rate (Table 7).
PAPER_UNTARGETED = {"deepfool": (98.00, 98.60, 61.10, 64.30), "boundary": (100, 100, 100, 100),
                    "local_search": (99.90, 100, 88.80, 93.10)}
PAPER_CW = {0.0: (100, 100, 84.65, 93.93, 94.80, 70.84),
            500.0: (99.78, 99.78, 76.61, 76.55, 84.07, 61.26),
            1000.0: (90.24, 95.98, 45.56, 47.86, 75.13, 48.86)}
NAMES = {"fgsm": "FGSM", "pgd": "PGD", "deepfool": "DeepFool", "boundary": "Boundary",
         "local_search": "LocalSearch", "cw_l2": "CW-L2"}


def _baseline_model(config):
    """(model, manifest hash) of --attack_baseline's discriminative run, checked to fit."""
    if not config.attack_baseline:
        return None
    baseline = Run(config.attack_baseline)
    manifest = baseline.model.folder / artifacts.MANIFEST
    if not manifest.exists():
        raise ConfigError(f"--attack_baseline={baseline.root}: no finished train stage in it "
                          f"({manifest} missing)")
    trained = baseline.model.manifest()["config"]
    dataset = baseline.examples.metadata.get("dataset")
    if trained.get("model") != "discriminative" or dataset != config.dataset:
        raise ConfigError(f"--attack_baseline={baseline.root} holds a {trained.get('model')} "
                          f"model of {dataset}; expected discriminative on {config.dataset}")
    return baseline.model.best(), artifacts.sha256_file(manifest)


def _untargeted(name, classifier, images, labels, thresholds, settings):
    fn = {"deepfool": adversarial.deepfool, "boundary": adversarial.boundary,
          "local_search": adversarial.local_search_attack}[name]
    result = fn(classifier, images, labels, settings)
    return _summary(result, images, thresholds), result


def _summary(result, images, thresholds) -> dict:
    distance = result.l2(images)[result.success]
    return {"attacked": int(len(images)), "successes": int(result.success.sum()),
            "success_rate": float(result.success.mean()) if len(images) else None,
            "detection_rate": {str(p): r for p, r in adversarial.detection_rates(
                result.logits, result.success, thresholds).items()},
            "median_l2": float(np.median(distance)) if len(distance) else None,
            "seconds": round(result.seconds, 1)}


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    settings = config.attack_settings()
    names = upstream["ingest"].class_names
    thresholds = {p: v["thresholds"] for p, v in upstream["calibrate"].percentiles().items()}
    model = Run(stage_dir.parent).deployable().model
    baseline = _baseline_model(config)
    count = max(settings.images, settings.cw_images)
    # enough test images to find `count` correctly classified ones
    images, labels = upstream["ingest"].arrays("test", limit=max(count * 4, 1000))
    classifier = adversarial.art_classifier(model, len(names), images.shape[1:],
                                            settings.batch_size)
    clean = classifier.predict(images)
    correct = adversarial.first_correct(clean, labels, count)
    if len(correct) == 0:
        raise ConfigError("attack: the model classifies none of the test images correctly")
    parts = artifacts.Parts(stage_dir / PARTS, artifacts.input_hashes(
        {name: view.folder for name, view in upstream.items()}))
    common = {"images": settings.images, "seed": settings.seed}
    report = {"dataset": config.dataset, "model": config.model,
              "settings": dataclasses.asdict(settings), "curves": {}, "untargeted": {},
              "cw_l2": {}, "first_image": {"index": int(correct[0]),
                                           "label": names[labels[correct[0]]]},
              "thresholds": {str(p): [float(x) for x in t] for p, t in thresholds.items()}}
    examples = {"original": images[correct[:1]]}
    first_logits = {"original": clean[correct[0]].tolist()}

    curve_images, curve_labels = images[:settings.images], labels[:settings.images]
    for attack in [a for a in adversarial.CURVE_ATTACKS if a in config.attacks]:
        key = {**common, "epsilons": settings.epsilons}
        if attack == "pgd":
            key.update(pgd_steps=settings.pgd_steps, pgd_step_size=settings.pgd_step_size)
        models = {config.model: (classifier, key)}
        if baseline is not None:
            models["discriminative"] = (
                adversarial.art_classifier(baseline[0], len(names), images.shape[1:],
                                           settings.batch_size), {**key, "baseline": baseline[1]})
        report["curves"][attack] = {}
        for name, (target, key) in models.items():
            part = f"{attack}_{name}"
            done = parts.get(part, key)
            if done is None:
                logging.info("attack: %s accuracy curve of %s over %d images", attack, name,
                             len(curve_images))
                done = parts.put(part, key, adversarial.accuracy_curve(
                    target, curve_images, curve_labels, attack, settings))
            report["curves"][attack][name] = done[0]
        logging.info("attack: %s accuracies %s", attack, report["curves"][attack])

    attacked, attacked_labels = images[correct[:settings.images]], labels[correct[:settings.images]]
    for attack in [a for a in adversarial.UNTARGETED_ATTACKS if a in config.attacks]:
        key = {**common, "steps": {"deepfool": settings.deepfool_steps,
                                   "boundary": settings.boundary_steps,
                                   "local_search": settings.local_search_rounds}[attack]}
        if attack == "deepfool":
            key["overshoot"] = settings.deepfool_overshoot
        done = parts.get(attack, key)
        if done is None:
            logging.info("attack: %s on %d correctly classified images", attack, len(attacked))
            summary, result = _untargeted(attack, classifier, attacked, attacked_labels,
                                          thresholds, settings)
            done = parts.put(attack, key, summary, {
                "adversarial": result.adversarial, "logits": result.logits,
                "success": result.success})
        summary, arrays = done
        report["untargeted"][attack] = summary
        shown = attack if arrays["success"][0] else f"{attack} (failed)"
        examples[shown] = arrays["adversarial"][:1]
        first_logits[shown] = arrays["logits"][0].tolist()
        logging.info("attack: %s success %s, detection %s (%.0f s)", attack,
                     summary["success_rate"], summary["detection_rate"], summary["seconds"])

    if "cw_l2" in config.attacks:
        chosen = correct[:settings.cw_images]
        classes = len(names)
        originals = np.repeat(images[chosen], classes - 1, axis=0)
        targets = np.concatenate([[t for t in range(classes) if t != y] for y in labels[chosen]])
        for kappa in settings.cw_confidences:
            part = f"cw_l2_k{kappa:g}"
            key = {"images": settings.cw_images, "seed": settings.seed, "kappa": kappa,
                   "steps": settings.cw_steps, "search_steps": settings.cw_search_steps}
            done = parts.get(part, key)
            if done is None:
                logging.info("attack: CW-L2 kappa=%g, %d images x %d targets", kappa,
                             len(chosen), classes - 1)
                result = adversarial.carlini_l2(classifier, originals, targets, kappa, settings)
                done = parts.put(part, key, _summary(result, originals, thresholds), {
                    "adversarial": result.adversarial, "logits": result.logits,
                    "success": result.success, "targets": targets})
            summary, arrays = done
            first = slice(0, classes - 1)  # the first image's attacks
            summary["first_image_target_logits"] = {
                names[t]: (float(lg[t]) if ok else None) for t, lg, ok in zip(
                    arrays["targets"][first], arrays["logits"][first], arrays["success"][first],
                    strict=True)}
            report["cw_l2"][f"{kappa:g}"] = summary
            logging.info("attack: CW-L2 kappa=%g success %s, detection %s (%.0f s)", kappa,
                         summary["success_rate"], summary["detection_rate"], summary["seconds"])
            ok = np.flatnonzero(arrays["success"][:classes - 1])
            if len(ok):
                examples[part] = arrays["adversarial"][ok[:1]]
                first_logits[part] = arrays["logits"][ok[0]].tolist()
    report["first_image"]["logits"] = first_logits

    outputs = [REPORT_JSON, REPORT_MD]
    if report["curves"]:
        plots.accuracy_curves(settings.epsilons, report["curves"], stage_dir / CURVES_PNG)
        outputs.append(CURVES_PNG)
    first_thresholds = next(iter(thresholds.values()))
    captions = []
    for name, lg in first_logits.items():
        c = int(np.argmax(lg))
        verdict = "rejected" if lg[c] < first_thresholds[c] else "accepted"
        captions.append(f"{name}\n{names[c]}: {lg[c]:.1f} vs {first_thresholds[c]:.1f}\n"
                        f"{verdict}")
    plots.image_grid([examples[k][0] for k in first_logits], captions,
                     stage_dir / EXAMPLES_PNG, columns=min(5, len(captions)),
                     title="First attacked test image: largest log-likelihood vs threshold")
    np.savez_compressed(stage_dir / f".{EXAMPLES_NPZ}.tmp.npz",
                        **{k: v for k, v in examples.items()})
    (stage_dir / f".{EXAMPLES_NPZ}.tmp.npz").replace(stage_dir / EXAMPLES_NPZ)
    outputs += [EXAMPLES_PNG, EXAMPLES_NPZ]
    report["figures"] = [o for o in outputs if o.endswith(".png")]
    artifacts.write_json(stage_dir / REPORT_JSON, report)
    artifacts.write_text(stage_dir / REPORT_MD, markdown(report, names))
    return outputs


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def markdown(report: dict, names) -> str:
    s = report["settings"]
    percentiles = list(report["thresholds"])
    lines = [f"# Adversarial evaluation: {report['dataset']} ({report['model']})", "",
             "An adversarial example is *detected* when the deployed rule (equation 9) rejects "
             "it. Only correctly classified test images are attacked (the paper: the first "
             "1000 test images). The paper's numbers are for MNIST and CIFAR10.", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()), ""]
    if report["curves"]:
        lines += ["## Figures 4 and 5: accuracy under FGSM and PGD-L∞", "",
                  f"First {s['images']} test images; PGD with a random start.", ""]
        lines.append("| attack | model | " + " | ".join(f"ε={e:g}" for e in s["epsilons"])
                     + " |")
        lines.append("|---|---|" + "---|" * len(s["epsilons"]))
        for attack, by_model in report["curves"].items():
            for model, accuracies in by_model.items():
                lines.append(f"| {NAMES[attack]} | {model} | "
                             + " | ".join(f"{100 * a:.1f}" for a in accuracies) + " |")
        lines += ["", f"![curves]({CURVES_PNG})", ""]
    if report["untargeted"]:
        lines += ["## Table 5: untargeted attacks", "",
                  "| attack | attacked | success | " + " | ".join(
                      f"detected p{p}" for p in percentiles)
                  + " | median L2 | seconds | paper MNIST p1 / p2 | paper CIFAR10 p1 / p2 |",
                  "|---|---|---|" + "---|" * len(percentiles) + "---|---|---|---|"]
        for attack, v in report["untargeted"].items():
            paper = PAPER_UNTARGETED.get(attack)
            lines.append(
                f"| {NAMES[attack]} | {v['attacked']} | {_pct(v['success_rate'])} | "
                + " | ".join(_pct(v["detection_rate"][p]) for p in percentiles)
                + f" | {v['median_l2'] if v['median_l2'] is None else round(v['median_l2'], 3)}"
                f" | {v['seconds']} | {paper[0]:.2f}% / {paper[1]:.2f}% | "
                f"{paper[2]:.2f}% / {paper[3]:.2f}% |")
        lines.append("")
    if report["cw_l2"]:
        lines += ["## Table 7: targeted CW-L2", "",
                  f"The first {s['cw_images']} correctly classified test images, each towards "
                  "every other class. Success: the target's log-likelihood leads by at least κ.",
                  "", "| κ | attacks | success | " + " | ".join(
                      f"detected p{p}" for p in percentiles)
                  + " | seconds | paper MNIST p1 / p2 / success | paper CIFAR10 |",
                  "|---|---|---|" + "---|" * len(percentiles) + "---|---|---|"]
        for kappa, v in report["cw_l2"].items():
            paper = PAPER_CW.get(float(kappa))
            cells = (f"{paper[0]:.2f}% / {paper[1]:.2f}% / {paper[2]:.2f}% | "
                     f"{paper[3]:.2f}% / {paper[4]:.2f}% / {paper[5]:.2f}%") if paper else "— | —"
            lines.append(f"| {kappa} | {v['attacked']} | {_pct(v['success_rate'])} | "
                         + " | ".join(_pct(v["detection_rate"][p]) for p in percentiles)
                         + f" | {v['seconds']} | {cells} |")
        lines += ["", "### Table 6: the first image's target log-likelihoods (— = failed)", "",
                  "| κ | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for kappa, v in report["cw_l2"].items():
            row = v["first_image_target_logits"]
            lines.append(f"| {kappa} | " + " | ".join(
                "·" if n not in row else ("—" if row[n] is None else f"{row[n]:.1f}")
                for n in names) + " |")
        lines.append("")
    first = report["first_image"]
    lines += [f"## Table 4: log-likelihoods of the first attacked image ({first['label']}, "
              f"test index {first['index']})", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p, t in report["thresholds"].items():
        lines.append(f"| threshold p{p} | " + " | ".join(f"{x:.1f}" for x in t) + " |")
    for name, lg in first["logits"].items():
        best = int(np.argmax(lg))
        lines.append(f"| {name} | " + " | ".join(
            f"**{x:.1f}**" if c == best else f"{x:.1f}" for c, x in enumerate(lg)) + " |")
    lines += ["", f"![examples]({EXAMPLES_PNG})"]
    return "\n".join(lines) + "\n"
