"""What calibrate, evaluate and export share: the trained model and its log-likelihoods."""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow as tf

from pipeline import artifacts
from pipeline.stages import ingest, train
from sdim_tf import data


def metadata(run_dir: pathlib.Path) -> dict:
    return artifacts.read_json(pathlib.Path(run_dir) / "ingest" / ingest.METADATA)


def log_likelihoods(model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(summed log p(x|c) [N, C] float64, labels [N]) over a dataset of (images, labels)."""

    @tf.function
    def forward(images):
        return model(images, training=False)

    outputs, labels = [], []
    for images, batch_labels in dataset:
        outputs.append(forward(images).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(outputs).astype(np.float64), np.concatenate(labels)


def split_dataset(ingest_dir: pathlib.Path, split: str, skip: int = 0,
                  limit: int | None = None, batch_size: int = 500) -> tf.data.Dataset:
    """Preprocessed (images, labels) batches of an ingested split, in file order."""
    meta = artifacts.read_json(ingest_dir / ingest.METADATA)
    return data.make_dataset(ingest.shard_files(ingest_dir, split), meta["image_shape"],
                             batch_size, training=False, skip=skip, limit=limit)


def split_arrays(ingest_dir: pathlib.Path, split: str, limit: int | None = None,
                 skip: int = 0):
    """(images float32 [N, 32, 32, C] in [0, 1], labels [N]): `limit` examples after `skip`."""
    batches = list(split_dataset(ingest_dir, split, skip, limit).as_numpy_iterator())
    return (np.concatenate([b[0] for b in batches]).astype(np.float32),
            np.concatenate([b[1] for b in batches]))


def split_log_likelihoods(model, ingest_dir: pathlib.Path, split: str, skip: int = 0,
                          limit: int | None = None, batch_size: int = 500):
    return log_likelihoods(model, split_dataset(ingest_dir, split, skip, limit, batch_size))


def array_log_likelihoods(model, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """log-likelihoods of uint8 source images (preprocessed) or float images in [0, 1]."""
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(
        lambda x: (data.preprocess(x), tf.zeros(tf.shape(x)[:1], tf.int64)))
    return log_likelihoods(model, ds)[0]


def best_model(run_dir: pathlib.Path):
    """The trained classifier (the checkpoint of least training loss)."""
    return train.best_model(pathlib.Path(run_dir) / "train")


def scoring_model(run_dir: pathlib.Path):
    """What the run deploys: images -> [N, C] class scores whose argmax is the prediction
    and whose maximum meets the calibrated thresholds. The trained classifier itself, or
    with --score=feature_density its fitted `density.FeatureDensity`."""
    from pipeline.stages import calibrate  # calibrate imports this module
    from sdim_tf import density

    calibrate_dir = pathlib.Path(run_dir) / "calibrate"
    saved = artifacts.read_json(calibrate_dir / calibrate.THRESHOLDS)
    model = best_model(run_dir)
    if saved.get("score") != "feature_density":
        return model
    scorer = density.FeatureDensity(model, len(saved["class_names"]), saved["density_layers"])
    with np.load(calibrate_dir / calibrate.DENSITY) as parameters:
        scorer.load_parameters(dict(parameters))
    return scorer
