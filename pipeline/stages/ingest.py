"""Ingest: a dataset -> TFRecord shards of tf.train.Example + metadata.json.

TFX ExampleGen + StatisticsGen in one stage: the examples, per-class counts, pixel
statistics, class names, the source files with their sha256 and the feature schema.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import artifacts
from pipeline.run_dir import Examples
from sdim_tf import data

EXAMPLES_PER_SHARD = 20_000


def _write_shards(folder: pathlib.Path, split: str, images: np.ndarray,
                  labels: np.ndarray) -> list[str]:
    num_shards = max(1, -(-len(images) // EXAMPLES_PER_SHARD))
    names = []
    for shard in range(num_shards):
        name = f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"
        lo, hi = shard * EXAMPLES_PER_SHARD, (shard + 1) * EXAMPLES_PER_SHARD
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for image, label in zip(images[lo:hi], labels[lo:hi], strict=True):
                writer.write(data.serialize_example(image, label))
        names.append(name)
    return names


def _statistics(images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    pixels = images.astype(np.float64) / 255.0
    return {
        "num_examples": int(len(labels)),
        "class_counts": np.bincount(labels, minlength=num_classes).astype(int).tolist(),
        "pixel_mean": float(pixels.mean()),
        "pixel_std": float(pixels.std()),
    }


def ingest(dataset: str, output_dir: str | os.PathLike,
           data_dir: Optional[str] = None) -> dict:
    """Reads both splits of `dataset` and writes them into `output_dir` atomically.

    Returns the metadata written to `output_dir/metadata.json`.
    """
    spec = data.get_spec(dataset)
    start = time.time()
    with artifacts.atomic_dir(output_dir) as tmp:
        splits, sources, class_names = {}, [], spec.class_names
        shape = None
        for split in data.SPLITS:
            loaded = data.load_split_with_source(dataset, split, data_dir)
            if loaded.class_names is not None:
                class_names = class_names or tuple(loaded.class_names)
            num_classes = spec.num_classes or len(class_names)
            if shape is None:
                shape = list(loaded.images.shape[1:])
            elif list(loaded.images.shape[1:]) != shape:
                raise data.DataError(f"{dataset}: {split} images have shape "
                                     f"{loaded.images.shape[1:]}, train images {shape}")
            bad = (loaded.labels < 0) | (loaded.labels >= num_classes)
            if bad.any():
                raise data.DataError(f"{dataset}/{split}: label {loaded.labels[bad][0]} "
                                     f"outside [0, {num_classes})")
            if len(loaded.labels) == 0:
                raise data.DataError(f"{dataset}/{split}: no examples")
            logging.info("ingest %s/%s: %d examples from %s", dataset, split,
                         len(loaded.labels), loaded.source)
            splits[split] = {
                **_statistics(loaded.images, loaded.labels, num_classes),
                "files": _write_shards(tmp, split, loaded.images, loaded.labels),
            }
            sources.append({
                "split": split, "source": loaded.source,
                "files": [{"path": str(f), "sha256": artifacts.sha256_file(f)}
                          for f in loaded.files],
            })
        metadata = {
            "dataset": dataset,
            "num_classes": num_classes,
            "class_names": list(class_names),
            "image_shape": shape,
            "augmentation": spec.augmentation,
            "splits": splits,
            "sources": sources,
            "schema": {"image": "bytes: raw uint8 [height, width, channels], row-major",
                       "label": "int64", "height": "int64", "width": "int64",
                       "channels": "int64"},
            "seconds": round(time.time() - start, 2),
        }
        Examples(output_dir).write_metadata(metadata, folder=tmp)
    return metadata


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    """Pipeline entry: ingest --dataset into `stage_dir`."""
    del upstream
    metadata = ingest(config.data.dataset, stage_dir, config.data.data_dir)
    shards = (f for split in metadata["splits"].values() for f in split["files"])
    return [Examples.METADATA, *shards]
