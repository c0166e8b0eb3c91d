"""Screening of rejection scores on a trained run (docs/results.md, "The threshold rule").

For each candidate score -- the model's own log p(x|c) (the paper's) or tied Gaussians
(sdim_tf.density) on a set of encoder layers -- fitted on the trained images:

1. Selection, on data held out from training only: the accuracy and reject rates on the
   validation split (--validation_split of the run) and the AUROC against proxy outliers
   made from validation images (flipped upside down, inverted, pixel-permuted,
   tile-shuffled). No OOD test data takes part.
2. The final measure, on the test sets: accuracy, reject rates, and the decision rule's
   rejection and AUROC on the evaluate stage's OOD sets.

python -m bench.posthoc_scores --run_dir=runs/fashion_mnist-sdim-v5k
Writes bench/results/posthoc_scores_<run>.json.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from pipeline import artifacts
from pipeline.run_dir import Run
from sdim_tf import data, density, metrics, ood_data, outlier_proxies, rejection

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A run with ingest and train done and a validation split.")
flags.DEFINE_list("percentiles", ["1", "2", "3", "4"], "Threshold percentiles.")
flags.DEFINE_integer("trained_validation", 0,
                     "For a run without --validation_split only: its last N training images "
                     "act as the validation set, although the model trained on them (the "
                     "JSON says validation_held_out: false).")
flags.DEFINE_float("reject_budget", 0.04, "As pipeline.run's: the deployed percentile is "
                   "the largest rejecting at most this share of the validation images.")
flags.DEFINE_integer("proxy_images", 2000, "Validation images per proxy-outlier set.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                    "Where the JSON goes.")

CANDIDATES = (("model",), ("z",), ("head",), ("stage4",), ("stage3",), ("stage4", "z"),
              ("stage3", "stage4"), ("stage3", "stage4", "z"), ("stage3", "stage4", "head"),
              ("stage2", "stage3", "stage4", "z"), density.LAYERS)


def features(model, dataset) -> tuple[dict, np.ndarray]:
    """({layer: [N, d], "model": log p(x|c) [N, C]}, labels) over (images, labels) batches."""

    @tf.function
    def forward(images):
        out = model.encoder.features(images, training=False)
        out = {k: out[k] for k in density.LAYERS}
        out["model"] = model.class_conditional(out["z"])
        return out

    parts, labels = [], []
    for images, batch_labels in dataset:
        parts.append({k: v.numpy().astype(np.float64) for k, v in forward(images).items()})
        labels.append(batch_labels.numpy())
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, np.concatenate(labels)


def layer_scores(fit: dict, labels: np.ndarray, num_classes: int):
    """layer -> (features [N, d] -> standardised class scores [N, C]), FeatureDensity's
    formula (sdim_tf.density) in float64."""
    scorers = {}
    for layer in density.LAYERS:
        stats = density.TiedGaussianStats(num_classes, fit[layer].shape[1])
        stats.update(fit[layer], labels)
        means, factor = stats.fit()

        def score(x, means=means, factor=factor):
            return density.standardized_scores(tf.constant(x, tf.float64), means,
                                               factor).numpy()

        scorers[layer] = score
    return scorers


def measure(scores: dict, labels: dict, percentiles, proxies, oods) -> dict:
    """scores: set -> [N, C]. Thresholds come from the validation set."""
    predicted = {k: v.argmax(1) for k, v in scores.items()}
    top = {k: v.max(1) for k, v in scores.items()}
    val_correct = predicted["val"] == labels["val"]
    result = {"val_accuracy": float(val_correct.mean()),
              "test_accuracy": float((predicted["test"] == labels["test"]).mean()),
              "proxy_auroc": {k: metrics.auroc(top["val"], top[k]) for k in proxies},
              "ood_auroc": {k: metrics.auroc(top["test"], top[k]) for k in oods},
              "percentiles": {}}
    result["proxy_auroc_mean"] = float(np.mean(list(result["proxy_auroc"].values())))
    num_classes = scores["val"].shape[1]
    for p in percentiles:
        per_class = np.array([rejection.percentile_value(
            top["val"][val_correct & (labels["val"] == c)], p) for c in range(num_classes)])
        result["percentiles"][str(p)] = _rule(per_class, top, predicted, labels, proxies, oods)
        # One threshold for every class, for comparison with the paper's per-class rule.
        shared = np.full(num_classes, rejection.percentile_value(top["val"][val_correct], p))
        result.setdefault("shared_threshold", {})[str(p)] = _rule(
            shared, top, predicted, labels, proxies, oods)
    # The budget percentile (the rule before split conformal): the largest within
    # --reject_budget on validation.
    for key, shared in (("budget", False), ("budget_shared_threshold", True)):
        budget = rejection.budget_percentile(scores["val"], labels["val"], FLAGS.reject_budget,
                                             shared=shared)
        thresholds = rejection.calibrate(scores["val"], labels["val"], (budget,), shared)
        result[key] = {"reject_budget": FLAGS.reject_budget, "percentile": budget,
                       **_rule(thresholds[budget]["thresholds"], top, predicted, labels,
                               proxies, oods)}
    return result


def _rule(thresholds, top, predicted, labels, proxies, oods) -> dict:
    rejected = {k: top[k] < thresholds[predicted[k]] for k in top}
    kept = ~rejected["test"]
    return {"val_rejected": float(rejected["val"].mean()),
            "proxy_rejected": {k: float(rejected[k].mean()) for k in proxies},
            "test_rejected": float(rejected["test"].mean()),
            "test_accuracy_kept": float((predicted["test"] == labels["test"])[kept].mean()),
            "ood_rejected": {k: float(rejected[k].mean()) for k in oods}}


def main(argv):
    del argv
    if not FLAGS.run_dir:
        sys.exit("error: --run_dir is required")
    run = Run(FLAGS.run_dir)
    run_dir = run.root
    started = time.time()
    trained, seed = run.model.settings, run.model.seed
    num_train = run.examples.num_examples("train")
    fit_range, val_range = run.model.examples("trained"), run.model.examples("held_out")
    held_out = val_range is not None
    if not held_out:
        if not FLAGS.trained_validation:
            sys.exit(f"error: {run_dir} was trained without --validation_split; selection "
                     f"needs held-out images (or --trained_validation=N, see --help)")
        n = FLAGS.trained_validation
        fit_range, val_range = (0, num_train - n), (num_train - n, n)
    model = run.model.best()
    sets, labels = {}, {}
    for name, (skip, limit) in (("fit", fit_range), ("val", val_range)):
        sets[name], labels[name] = features(model, run.examples.dataset("train", skip, limit))
    sets["test"], labels["test"] = features(model, run.examples.dataset("test"))
    val_images, _ = run.examples.arrays("train", limit=val_range[1], skip=val_range[0])
    proxies = outlier_proxies.proxy_outliers(val_images[:FLAGS.proxy_images], seed=seed)
    oods, _ = ood_data.ood_sets(run.examples.dataset_name, run.examples.image_shape, seed=seed)
    for name, images in {**proxies, **oods}.items():
        sets[name], labels[name] = features(model, data.image_batches(images))
    scorers = layer_scores(sets["fit"], labels["fit"], run.examples.num_classes)
    del sets["fit"]
    percentiles = [float(p) if "." in p else int(p) for p in FLAGS.percentiles]
    record = {"run_dir": str(run_dir), "trained": trained, "validation_held_out": held_out,
              "command": " ".join(["python -m bench.posthoc_scores", *sys.argv[1:]]),
              "proxies": list(proxies), "ood": list(oods), "candidates": {}}
    for candidate in CANDIDATES:
        if candidate == ("model",):
            scores = {k: v["model"] for k, v in sets.items()}
        else:
            scores = {k: sum(scorers[layer](v[layer]) for layer in candidate)
                      for k, v in sets.items()}
        record["candidates"]["+".join(candidate)] = measure(
            scores, labels, percentiles, list(proxies), list(oods))
    record["seconds"] = round(time.time() - started, 1)
    artifacts.write_json(pathlib.Path(FLAGS.out) / f"posthoc_scores_{run_dir.name}.json",
                         record)
    print(f"{'score':38s} val acc  proxy AUROC  val rej p1/p3  | test acc  rej p1/p3  "
          + "  ".join(f"{k} rej p1/p3, AUROC" for k in oods))
    for name, r in record["candidates"].items():
        at = {p: r["percentiles"].get(p, {}) for p in ("1", "3")}

        def pair(key, sub=None, at=at):
            values = [v.get(key, {}) if sub else v.get(key) for v in at.values()]
            values = [v.get(sub) if sub else v for v in values]
            return "/".join("-" if v is None else f"{100 * v:.2f}" for v in values)

        print(f"{name:38s} {100 * r['val_accuracy']:6.2f}  {r['proxy_auroc_mean']:.4f}  "
              f"{pair('val_rejected')}  | {100 * r['test_accuracy']:6.2f}  "
              f"{pair('test_rejected')}  " + "  ".join(
                  f"{pair('ood_rejected', k)}, {r['ood_auroc'][k]:.4f}" for k in oods))

if __name__ == "__main__":
    app.run(main)
