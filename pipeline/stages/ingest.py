"""Ingest: a dataset -> TFRecord shards of tf.train.Example + metadata.json.

TFX ExampleGen + StatisticsGen in one stage: the examples, per-class counts, pixel
statistics, class names, the sources with their sha256 and the feature schema. Your own
images stream through `sdim_tf.data.examplegen` (or its Beam driver): `files.csv` lists the
files that became examples, `skipped.csv` the ones left out and why, and exact duplicates
between train and test are reported (leakage).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import pathlib
import time
from typing import Optional

from absl import logging

from pipeline import artifacts
from pipeline.run_dir import Examples
from sdim_tf import data
from sdim_tf.data import folders

SKIPPED = "skipped.csv"
REPORTED_DUPLICATES = 20  # pairs listed in metadata.json; all are counted


def _ingest_arrays(dataset: str, data_dir: Optional[str], tmp: pathlib.Path
                   ) -> tuple[dict, list[data.Skipped]]:
    """IDX files or tfds: each split in memory, in its source order."""
    spec = data.get_spec(dataset)
    splits, sources, shape = {}, [], None
    class_names = spec.class_names
    num_classes = spec.num_classes
    for split in data.SPLITS:
        loaded = data.load_split_with_source(dataset, split, data_dir)
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
        stats = data.SplitStats(num_classes).add(loaded.images, loaded.labels)
        splits[split] = {**stats.as_dict(),
                         "files": data.write_shards(tmp, split, loaded.images, loaded.labels)}
        sources.append({"split": split, "source": loaded.source,
                        "files": [{"path": str(f), "sha256": artifacts.sha256_file(f)}
                                  for f in loaded.files]})
    return {"num_classes": num_classes, "class_names": list(class_names),
            "image_shape": shape, "splits": splits, "sources": sources}, []


def _reason_counts(skipped: list[data.Skipped]) -> dict[str, int]:
    return dict(sorted(collections.Counter(s.reason.split(":")[0] for s in skipped).items()))


def _ingest_folder(source: data.Source, options: data.FolderOptions, tmp: pathlib.Path,
                   progress: bool) -> tuple[dict, list[data.Skipped]]:
    """Image folders or a manifest: listed, then streamed by the options' driver."""
    listing = data.list_folder(source, options)
    policy = data.policy_for(source.spec, listing, options)
    logging.info("ingest %s: %s images (train, test) from %s, as %s", source.spec.name,
                 [len(listing.items[s]) for s in data.SPLITS], listing.where, policy.shape)
    written = data.write_examples(listing, policy, tmp, options, progress)
    skipped = [*listing.skipped, *written.skipped]
    counts = {split: written.stats[split].class_counts for split in data.SPLITS}
    folders.check_class_sizes(listing.class_names, counts, listing.where)
    if skipped:
        logging.warning("ingest: %d files skipped (%s), listed in %s", len(skipped),
                        ", ".join(f"{k}: {v}" for k, v in _reason_counts(skipped).items()),
                        SKIPPED)
    duplicates = written.duplicates
    if duplicates:
        logging.warning("ingest: %d test images are exact copies of training images "
                        "(leakage: they measure memory, not generalisation), e.g. %s = %s",
                        len(duplicates), duplicates[0]["test"], duplicates[0]["train"])
    splits = {split: {**written.stats[split].as_dict(), "files": written.files[split]}
              for split in data.SPLITS}
    body = {
        "num_classes": len(listing.class_names),
        "class_names": listing.class_names,
        "image_shape": policy.shape,
        "splits": splits,
        "sources": [{"split": split, "source": f"image_folder:{listing.folder}",
                     "file_list": data.FILES, "num_files": splits[split]["num_examples"]}
                    for split in data.SPLITS],
        "folder": {
            "layout": listing.layout,
            "folder": str(listing.folder),
            "test_split": listing.test_source,
            "policy": dataclasses.asdict(policy),
            "channel_votes": listing.channel_votes,
            "options": dataclasses.asdict(options),
            "skipped": len(skipped),
            "skipped_reasons": _reason_counts(skipped),
        },
        "duplicates": {"train_test": len(duplicates),
                       "pairs": duplicates[:REPORTED_DUPLICATES]},
    }
    return body, skipped


def _write_skipped(path: pathlib.Path, skipped: list[data.Skipped]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(folders.SKIPPED_HEADER)
        rows.writerows(s.row() for s in skipped)


def ingest(dataset: str, output_dir: str | os.PathLike, data_dir: Optional[str] = None,
           options: Optional[data.FolderOptions] = None, progress: bool = True) -> dict:
    """Reads both splits of `dataset` and writes them into `output_dir` atomically.

    `options`: how image folders are read (`sdim_tf.data.FolderOptions`; unused for IDX files
    and tfds). Returns the metadata written to `output_dir/metadata.json`.
    """
    spec = data.get_spec(dataset)
    options = options or data.FolderOptions()
    source = data.find_source(dataset, data_dir, options.manifest)
    start = time.time()
    with artifacts.atomic_dir(output_dir) as tmp:
        if source.kind == "image_folder":
            body, skipped = _ingest_folder(source, options, tmp, progress)
        else:
            body, skipped = _ingest_arrays(dataset, data_dir, tmp)
        _write_skipped(tmp / SKIPPED, skipped)
        metadata = {
            "dataset": dataset,
            **body,
            "augmentation": spec.augmentation,
            "schema": data.SCHEMA,
            "seconds": round(time.time() - start, 2),
        }
        Examples(output_dir).write_metadata(metadata, folder=tmp)
    return metadata


def outputs(metadata: dict) -> list[str]:
    """The files ingest wrote, relative to its folder."""
    shards = [f for split in metadata["splits"].values() for f in split["files"]]
    listed = [data.FILES] if "folder" in metadata else []
    return [Examples.METADATA, SKIPPED, *listed, *shards]


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    """Pipeline entry: ingest --dataset into `stage_dir`."""
    del upstream
    options = getattr(config.data, "folder", None) or data.FolderOptions()
    return outputs(ingest(config.data.dataset, stage_dir, config.data.data_dir, options))
