"""Image files -> TFRecord shards, streaming: TFX ExampleGen for your own images.

Two drivers run the same per-file logic (`images.ImageEncoder`): `write_local` decodes in
parallel in this process (tf.data) and writes the shards in the listed order;
`sdim_tf.data.beam.write_beam` runs it as an Apache Beam pipeline. Both hold a bounded
number of images in memory whatever the dataset's size, and both write:

- `<split>-SSSSS-of-NNNNN.tfrecord` shards of `tfrecords.serialize_example`;
- `files.csv`: split, path, label, sha256 of every file that became an example;
and return the statistics, the files skipped while decoding, and the exact duplicates
between train and test (same file content: leakage).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pathlib
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from sdim_tf.data.folders import Item, Listing, Skipped, bad_file
from sdim_tf.data.images import Encoded, ImageEncoder, ImagePolicy
from sdim_tf.data.registry import SPLITS
from sdim_tf.data.statistics import SplitStats
from sdim_tf.data.tfrecords import ShardWriter

FILES = "files.csv"
FILES_HEADER = ("split", "path", "label", "sha256")
BATCH = 64  # decoded images handed from tf.data to Python at a time
STATS_EVERY = 512  # images counted into the statistics at a time (numpy per call is slow)


@dataclasses.dataclass
class Written:
    """What a driver wrote: per split the shard names and statistics, the files skipped
    while decoding, and the train/test duplicates."""

    files: dict[str, list[str]]
    stats: dict[str, SplitStats]
    skipped: list[Skipped]
    duplicates: list[dict]  # {"sha256", "train", "test"}, sorted by test path


def csv_line(values: Sequence) -> str:
    """One CSV row (quoted as csv does), without the line end."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()


def duplicate_pairs(sha256: str, train_paths: Sequence[str], test_paths: Sequence[str]
                    ) -> list[dict]:
    """A test file whose content is a training file's: one pair per test file, against the
    first training path."""
    if not train_paths or not test_paths:
        return []
    first = min(train_paths)
    return [{"sha256": sha256, "train": first, "test": path} for path in sorted(test_paths)]


def _paths_file(items: Sequence[Item], folder: str) -> str:
    """The items' paths as TFRecords: tf.data streams them (a tensor of every path would
    hold them all in memory), whatever bytes a path holds."""
    path = os.path.join(folder, "paths.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for item in items:
            writer.write(os.fsencode(item.path))
    return path


def encoded_items(items: Sequence[Item], policy: ImagePolicy, progress: str = ""
                  ) -> Iterator[tuple[Item, Encoded]]:
    """(item, outcome) in `items`' order. Reading, decoding and resizing run in parallel in
    tf.data; a file that fails there is encoded again alone, which gives its reason."""
    encoder = ImageEncoder(policy)

    @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python control flow
    def load(index, path):
        raw = tf.io.read_file(path)
        return index, raw, encoder.image(raw)

    with tempfile.TemporaryDirectory(prefix="sdim-ingest-") as work:
        ds = tf.data.TFRecordDataset(_paths_file(items, work)).enumerate()
        ds = (ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
              .ignore_errors().batch(BATCH).prefetch(2))
        bar = tqdm(total=len(items), desc=progress, unit="img", disable=not progress,
                   mininterval=1.0)
        expected = 0
        with bar:
            for indices, raws, decoded in ds.as_numpy_iterator():
                for index, raw, image in zip(indices, raws, decoded, strict=True):
                    for failed in range(expected, int(index)):  # dropped by ignore_errors
                        yield items[failed], encoder.encode(items[failed].path,
                                                            items[failed].label)
                    item = items[int(index)]
                    yield item, encoder.finish(raw, image, item.label)
                    expected = int(index) + 1
                bar.update(expected - bar.n)
            for failed in range(expected, len(items)):
                yield items[failed], encoder.encode(items[failed].path, items[failed].label)
            bar.update(len(items) - bar.n)


class _Split:
    """One split's shard writer and statistics (counted STATS_EVERY images at a time)."""

    def __init__(self, folder: pathlib.Path, split: str, num_classes: int):
        self.writer = ShardWriter(folder, split)
        self.stats = SplitStats(num_classes)
        self.pending: list[tuple[np.ndarray, int]] = []

    def add(self, outcome: Encoded, label: int) -> None:
        self.writer.write(outcome.example)
        self.pending.append((outcome.image, label))
        if len(self.pending) == STATS_EVERY:
            self._count()

    def _count(self) -> None:
        if self.pending:
            self.stats.add(np.stack([image for image, _ in self.pending]),
                           [label for _, label in self.pending])
            self.pending.clear()

    def close(self) -> list[str]:
        self._count()
        return self.writer.close()


def write_local(listing: Listing, policy: ImagePolicy, folder: str | os.PathLike,
                on_bad_file: str = "skip", progress: bool = True) -> Written:
    """The in-process driver: each split's shards in the listed order (one tf.data
    pipeline over both splits)."""
    folder = pathlib.Path(folder)
    splits = {split: _Split(folder, split, len(listing.class_names)) for split in SPLITS}
    num_train = len(listing.items["train"])
    skipped: list[Skipped] = []
    train_hashes: dict[bytes, str] = {}  # sha256 digest (half a hex string's memory) -> path
    duplicates: list[dict] = []
    with open(folder / FILES, "w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(FILES_HEADER)
        outcomes = encoded_items([item for split in SPLITS for item in listing.items[split]],
                                 policy, "ingest" if progress else "")
        for position, (item, outcome) in enumerate(outcomes):
            split = "train" if position < num_train else "test"
            if outcome.reason:
                if on_bad_file == "fail":
                    raise bad_file(item.path, outcome.reason)
                skipped.append(Skipped(split, item.path, outcome.reason))
                continue
            splits[split].add(outcome, item.label)
            rows.writerow((split, item.path, item.label, outcome.sha256))
            digest = bytes.fromhex(outcome.sha256)
            if split == "train":
                train_hashes[digest] = min(train_hashes.get(digest, item.path), item.path)
            elif digest in train_hashes:  # every training file came first
                duplicates += duplicate_pairs(outcome.sha256, [train_hashes[digest]],
                                              [item.path])
    files = {split: part.close() for split, part in splits.items()}
    return Written(files, {split: part.stats for split, part in splits.items()}, skipped,
                   sorted(duplicates, key=lambda pair: pair["test"]))
