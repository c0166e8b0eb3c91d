"""Post-hoc OOD scores of a trained SDIM run (a measurement for issue 12, not a test).

Compares the model's own score (the predicted class's log p(z|c)) with a class-conditional
Gaussian score that shares one covariance across classes, fitted after training on the
training representations z (LDA; Mahalanobis distance). Both use the paper's rule:
per-class thresholds at a percentile of the correctly classified training scores.

python -m bench.posthoc_scores --run_dir=runs/fashion_mnist-sdim-e10
Writes bench/results/posthoc_scores_<run>.json.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from pipeline import artifacts, inference
from pipeline.config import PipelineConfig
from pipeline.stages import evaluate
from sdim_tf import data, metrics, rejection

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A finished SDIM run (ingest and train stages).")
flags.DEFINE_float("percentile", 1, "Threshold percentile of the training scores.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).resolve().parent / "results"),
                    "Where the JSON goes.")


def features(model, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z [N, d], log p(z|c) [N, C], labels [N]) over (images, labels) batches."""

    @tf.function
    def forward(images):
        _, z = model.encoder(images, training=False)
        return z, model.class_conditional(z)

    zs, lls, labels = [], [], []
    for images, batch_labels in dataset:
        z, ll = forward(images)
        zs.append(z.numpy())
        lls.append(ll.numpy())
        labels.append(batch_labels.numpy())
    return (np.concatenate(zs).astype(np.float64), np.concatenate(lls).astype(np.float64),
            np.concatenate(labels))


def shared_covariance_score(z_train, labels, num_classes):
    """A function z -> [N, C] Gaussian log-densities (up to a constant) with class means and
    one pooled covariance of the training z."""
    means = np.stack([z_train[labels == c].mean(0) for c in range(num_classes)])
    centred = z_train - means[labels]
    covariance = centred.T @ centred / len(z_train)
    precision = np.linalg.inv(covariance + 1e-6 * np.eye(len(covariance)))

    def score(z):
        d = z[:, None, :] - means[None]
        return -0.5 * np.einsum("ncd,de,nce->nc", d, precision, d)

    return score


def evaluate_score(scores: dict, labels: dict, percentile: float) -> dict:
    """scores: split -> [N, C]; the prediction is the argmax, the score its value."""
    predicted = {k: v.argmax(1) for k, v in scores.items()}
    top = {k: v.max(1) for k, v in scores.items()}
    train_correct = predicted["train"] == labels["train"]
    thresholds = np.array([
        rejection.percentile_value(top["train"][train_correct & (labels["train"] == c)],
                                   percentile)
        for c in range(scores["train"].shape[1])])
    rejected = {k: top[k] < thresholds[predicted[k]] for k in scores}
    correct = predicted["test"] == labels["test"]
    result = {"accuracy": float(correct.mean()), "reject_rate": float(rejected["test"].mean()),
              "accuracy_left": float(correct[~rejected["test"]].mean()), "ood": {}}
    for name in scores:
        if name not in ("train", "test"):
            result["ood"][name] = {"rejected": float(rejected[name].mean()),
                                   "auroc": metrics.auroc(top["test"], top[name])}
    return result


def main(argv):
    del argv
    if not FLAGS.run_dir:
        sys.exit("error: --run_dir is required")
    run_dir = pathlib.Path(FLAGS.run_dir)
    started = time.time()
    model = inference.best_model(run_dir)
    meta = inference.metadata(run_dir)
    feats = {split: features(model, inference.split_dataset(run_dir / "ingest", split))
             for split in ("train", "test")}
    sets, _ = evaluate.ood_sets(PipelineConfig(dataset=meta["dataset"]).resolve(), meta)
    for name, images in sets.items():
        images = images if images.dtype == np.float32 else data.preprocess(images).numpy()
        dataset = tf.data.Dataset.from_tensor_slices(
            (images, np.zeros(len(images), np.int64))).batch(500)
        feats[name] = features(model, dataset)
    labels = {k: v[2] for k, v in feats.items()}
    lda = shared_covariance_score(feats["train"][0], labels["train"], meta["num_classes"])
    record = {"run_dir": str(run_dir), "percentile": FLAGS.percentile,
              "command": " ".join(["python -m bench.posthoc_scores", *sys.argv[1:]]),
              "scores": {
                  "max_log_likelihood": evaluate_score(
                      {k: v[1] for k, v in feats.items()}, labels, FLAGS.percentile),
                  "shared_covariance": evaluate_score(
                      {k: lda(v[0]) for k, v in feats.items()}, labels, FLAGS.percentile)},
              "seconds": round(time.time() - started, 1)}
    artifacts.write_json(pathlib.Path(FLAGS.out) / f"posthoc_scores_{run_dir.name}.json",
                         record)
    for name, result in record["scores"].items():
        print(name, result)


if __name__ == "__main__":
    app.run(main)
