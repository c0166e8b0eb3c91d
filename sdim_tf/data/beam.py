"""The Apache Beam ingest driver (`pip install sdim-tf[beam]`): the per-file logic of
`images.ImageEncoder` as a Beam pipeline, ExampleGen-style.

The listing (and the channel majority, from the headers) is made where the pipeline is
launched; the reading, decoding, resizing, serializing and writing run on Beam's workers:
the in-process DirectRunner by default, its multi-processing mode with
`--direct_running_mode=multi_processing --direct_num_workers=N`, or a distributed runner
given by `pipeline_args` (its workers must see the files and the output folder).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from sdim_tf.data.examplegen import FILES, FILES_HEADER, Written, csv_line, duplicate_pairs
from sdim_tf.data.folders import Listing, Skipped, bad_file
from sdim_tf.data.images import ImageEncoder, ImagePolicy
from sdim_tf.data.registry import SPLITS
from sdim_tf.data.statistics import SplitStats
from sdim_tf.data.tfrecords import num_shards

_SKIPPED = "skipped"
_WORK = ".beam-work"  # side outputs read back by the launcher, then removed


class _Encode(beam.DoFn):
    """A JSON line [split, path, label] -> (split, path, label, sha256, example bytes,
    SplitStats), or a skipped CSV row on the tagged output."""

    def __init__(self, policy: ImagePolicy, num_classes: int):
        self.policy, self.num_classes = policy, num_classes
        self.encoder = None

    def setup(self):
        self.encoder = ImageEncoder(self.policy)

    def process(self, element):
        split, path, label = json.loads(element)
        outcome = self.encoder.encode(path, label)
        if outcome.reason:
            yield beam.pvalue.TaggedOutput(_SKIPPED, csv_line((split, path, outcome.reason)))
            return
        stats = SplitStats(self.num_classes).add(outcome.image, [label])
        yield split, path, label, outcome.sha256, outcome.example, stats


def _split_index(example, num_partitions: int) -> int:
    del num_partitions
    return SPLITS.index(example[0])


def _example_bytes(example) -> bytes:
    return example[4]


def _file_row(example) -> str:
    return csv_line(example[:4])


def _stats_entry(example):
    return example[0], example[5]


def _merge_stats(values: Iterable[SplitStats]) -> SplitStats:
    return functools.reduce(SplitStats.merge, values)


def _stats_json(entry) -> str:
    split, stats = entry
    return json.dumps({"split": split, "class_counts": stats.class_counts,
                       "pixel_sum": stats.pixel_sum, "pixel_squares": stats.pixel_squares,
                       "pixels": stats.pixels})


def _hash_entry(example):
    return example[3], (example[0], example[1])


def _pairs(entry) -> list[str]:
    sha256, members = entry
    paths = {split: [path for s, path in members if s == split] for split in SPLITS}
    return [json.dumps(pair) for pair in duplicate_pairs(sha256, paths["train"],
                                                          paths["test"])]


def _lines(path: pathlib.Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


class BeamOptionsError(ValueError):
    """pipeline_args Beam cannot run (an unknown runner)."""


def make_pipeline(pipeline_args: Sequence[str] = ()) -> beam.Pipeline:
    """A Beam pipeline on the runner `pipeline_args` name, default the in-process
    DirectRunner; options Beam refuses are one line naming --beam_pipeline_args."""
    try:
        return beam.Pipeline(options=PipelineOptions(
            list(pipeline_args) or ["--runner=DirectRunner"]))
    except ValueError as e:
        raise BeamOptionsError(f"--beam_pipeline_args: {str(e).splitlines()[0]}") from None


def write_beam(listing: Listing, policy: ImagePolicy, folder: str | os.PathLike,
               on_bad_file: str = "skip", pipeline_args: Sequence[str] = ()) -> Written:
    """The Beam driver: the same shards' examples (in another order) as `write_local`."""
    folder = pathlib.Path(folder)
    work = folder / _WORK
    work.mkdir()
    num_classes = len(listing.class_names)
    # The listing goes to the workers as a file (a large in-pipeline Create would not), in
    # JSON lines: one line per file whatever characters its path holds
    with open(work / "items.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps([split, item.path, item.label]) + "\n" for split in SPLITS
                     for item in listing.items[split])
    try:
        with make_pipeline(pipeline_args) as pipeline:
            encoded = (pipeline | "List" >> beam.io.ReadFromText(str(work / "items.jsonl"))
                       | "Spread" >> beam.Reshuffle()
                       | "Encode" >> beam.ParDo(_Encode(policy, num_classes)).with_outputs(
                           _SKIPPED, main="examples"))
            examples = encoded.examples
            parts = examples | "BySplit" >> beam.Partition(_split_index, len(SPLITS))
            for part, split in zip(parts, SPLITS, strict=True):
                _ = (part | f"{split}/Bytes" >> beam.Map(_example_bytes)
                     | f"{split}/Write" >> beam.io.WriteToTFRecord(
                         str(folder / split), file_name_suffix=".tfrecord",
                         num_shards=num_shards(len(listing.items[split]))))
            _ = (examples | "Files" >> beam.Map(_file_row)
                 | "WriteFiles" >> beam.io.WriteToText(
                     str(folder / FILES), shard_name_template="",
                     header=csv_line(FILES_HEADER)))
            _ = (examples | "StatsKey" >> beam.Map(_stats_entry)
                 | "Stats" >> beam.CombinePerKey(_merge_stats)
                 | "StatsJson" >> beam.Map(_stats_json)
                 | "WriteStats" >> beam.io.WriteToText(str(work / "stats.jsonl"),
                                                       shard_name_template=""))
            _ = (encoded[_SKIPPED] | "WriteSkipped" >> beam.io.WriteToText(
                str(work / "skipped.csv"), shard_name_template=""))
            _ = (examples | "HashKey" >> beam.Map(_hash_entry)
                 | "SameContent" >> beam.GroupByKey()
                 | "Pairs" >> beam.FlatMap(_pairs)
                 | "WriteDuplicates" >> beam.io.WriteToText(str(work / "duplicates.jsonl"),
                                                            shard_name_template=""))
        stats = {split: SplitStats(num_classes) for split in SPLITS}
        for line in _lines(work / "stats.jsonl"):
            entry = json.loads(line)
            split = entry.pop("split")
            stats[split] = SplitStats(num_classes, **entry)
        skipped = []
        if (work / "skipped.csv").exists():
            with open(work / "skipped.csv", newline="", encoding="utf-8") as f:
                skipped = sorted((Skipped(*row) for row in csv.reader(f)),  # quoted newlines
                                 key=lambda s: (SPLITS.index(s.split), s.path))
        duplicates = sorted((json.loads(line) for line in _lines(work / "duplicates.jsonl")),
                            key=lambda pair: pair["test"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if skipped and on_bad_file == "fail":
        raise bad_file(skipped[0].path, skipped[0].reason)
    files = {split: sorted(p.name for p in folder.glob(f"{split}-*-of-*.tfrecord"))
             for split in SPLITS}
    return Written(files, stats, skipped, duplicates)
