"""Ingest of a large image folder: peak memory and throughput against a plain tf.data loop.

    python -m bench.ingest_scale [--images=100000] [--driver=local] [--repeats=3]

Writes N PNG files of mixed sizes and modes into a class-folder layout, then, in one process
and over the same files (read once beforehand, so every phase finds them in the page cache),
alternates:

- the plain loop: tf.data reads, decodes (colour) and resizes to 32x32 in parallel; Python
  builds each tf.train.Example and writes it: what any ingest must at least do;
- the same loop writing with ingest's own serializer (`sdim_tf.data.serialize_example`);
- `pipeline.stages.ingest.ingest` of the folder (listing, file and header checks, channel
  majority, test split, content hashes, statistics, files.csv, skipped.csv).

The best wall time of the repeats counts (other processes only ever slow a run down); CPU
time is reported beside it. Peak RSS of each phase is sampled every 20 ms (psutil), and of
the whole process from getrusage. Targets: ingest peak RSS <= 1 GiB whatever N; ingest
throughput >= 0.8x each plain loop. Writes bench/results/<machine kind>/ingest_scale.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import psutil
import tensorflow as tf
from absl import app, flags
from PIL import Image

from bench import machine
from pipeline.stages import ingest
from sdim_tf import data

flags.DEFINE_integer("images", 100_000, "PNG files to write and ingest.")
flags.DEFINE_integer("classes", 10, "Class folders.")
flags.DEFINE_integer("min_side", 20, "Smallest image side.")
flags.DEFINE_integer("max_side", 96, "Largest image side.")
flags.DEFINE_enum("driver", "local", ["local", "beam"], "Ingest driver.")
flags.DEFINE_integer("repeats", 3, "Runs of each phase, alternated; the best counts.")
flags.DEFINE_string("workdir", None, "Where the files go (default: a temporary folder, "
                    "removed afterwards; a given one is kept and reused).")
flags.DEFINE_string("out", None, "JSON results (default: "
                    "bench/results/<machine kind>/ingest_scale.json).")
FLAGS = flags.FLAGS

GiB = 1 << 30


def write_folder(root: pathlib.Path, n: int, classes: int, sides: tuple[int, int],
                 seed: int = 0) -> list[str]:
    """N PNGs under root/train/<class>/: smooth gradients plus noise, mixed sizes; a third
    grey, a tenth palette, the rest RGB. Files already there are kept."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        (root / "train" / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / "train" / f"class_{i % classes:02d}" / f"{i:07d}.png"
        paths.append(str(path))
        h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        gradient = rng.uniform(0, 4, 2)
        colour = rng.uniform(0, 255, 3)
        if path.exists():
            continue
        y, x = np.mgrid[0:h, 0:w]
        base = (x * gradient[0] + y * gradient[1])[..., None] + colour
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if i % 30 < 10:
            image = image.convert("L")
        elif i % 30 < 13:
            image = image.quantize(colors=64)
        image.save(path, compress_level=1)
    return paths


@contextlib.contextmanager
def peak_rss() -> Iterator[dict]:
    """{"start_rss_bytes", "peak_rss_bytes"} of this process over the block, sampled."""
    process = psutil.Process()
    result = {"start_rss_bytes": process.memory_info().rss, "peak_rss_bytes": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            result["peak_rss_bytes"] = max(result["peak_rss_bytes"], process.memory_info().rss)
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result["peak_rss_bytes"] = max(result["peak_rss_bytes"], process.memory_info().rss)


def example_proto(image: np.ndarray, label: int) -> bytes:
    """A tf.train.Example built the usual way: the message, then its serialization."""
    h, w, c = image.shape

    def ints(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
               "label": ints(label), "height": ints(h), "width": ints(w), "channels": ints(c)}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True)


def plain_loop(paths: list[str], out: pathlib.Path,
               serialize: Callable[[np.ndarray, int], bytes], size: int = 32) -> int:
    """Decode, resize and write every file (as class 0): the reference ingest is measured
    against. Returns the number of shards."""

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), (size, size))
        return tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)

    ds = (tf.data.Dataset.from_tensor_slices(paths)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(64).prefetch(2))
    writer = data.ShardWriter(out, "train")
    for batch in ds.as_numpy_iterator():
        for image in batch:
            writer.write(serialize(image, 0))
    return len(writer.close())


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_all(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            f.read()


def main(argv):
    del argv
    work = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="ingest_scale-"))
    try:
        started = time.perf_counter()
        paths = write_folder(work / "images", FLAGS.images, FLAGS.classes,
                             (FLAGS.min_side, FLAGS.max_side))
        written = time.perf_counter() - started
        _read_all(paths)
        options = data.FolderOptions(ingest_driver=FLAGS.driver)

        def fresh(name: str) -> pathlib.Path:
            shutil.rmtree(work / name, ignore_errors=True)
            (work / name).mkdir()
            return work / name

        phases = {
            "plain_loop": lambda: plain_loop(paths, fresh("plain"), example_proto),
            "plain_loop_ingest_serializer": lambda: plain_loop(
                paths, fresh("plain"), data.serialize_example),
            "ingest": lambda: ingest.ingest("image_folder", work / "ingest",
                                            str(work / "images"), options, progress=False),
        }
        runs = {name: [] for name in phases}
        load_start = os.getloadavg()[0]
        rss = {}
        for _ in range(FLAGS.repeats):
            for name, run in phases.items():
                with peak_rss() as sampled:
                    wall, cpu = time.perf_counter(), _cpu_seconds()
                    result = run()
                    runs[name].append((time.perf_counter() - wall, _cpu_seconds() - cpu))
                rss[name] = max(rss.get(name, {"peak_rss_bytes": 0}), sampled,
                                key=lambda r: r["peak_rss_bytes"])
                if name == "ingest":
                    metadata = result
        figures = {"machine": machine.machine(), "images": FLAGS.images,
                   "sides": [FLAGS.min_side, FLAGS.max_side], "driver": FLAGS.driver,
                   "repeats": FLAGS.repeats, "write_seconds": round(written, 1),
                   # other processes' load: the runs' spread, and why the best counts
                   "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}}
        for name in phases:
            wall, cpu = min(runs[name])
            figures[name] = {
                "seconds": round(wall, 2), "images_per_second": round(FLAGS.images / wall, 1),
                "cpu_seconds": round(cpu, 2),
                "cpu_us_per_image": round(cpu / FLAGS.images * 1e6, 1),
                "all_seconds": [round(w, 2) for w, _ in runs[name]], **rss[name]}
        figures["ingest"].update(
            examples=sum(s["num_examples"] for s in metadata["splits"].values()),
            skipped=metadata["folder"]["skipped"], image_shape=metadata["image_shape"])
        figures["process_max_rss_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        plain = ("plain_loop", "plain_loop_ingest_serializer")
        figures["throughput_ratio"] = {
            name: round(figures[name]["seconds"] / figures["ingest"]["seconds"], 3)
            for name in plain}
        figures["cpu_ratio"] = {
            name: round(figures[name]["cpu_seconds"] / figures["ingest"]["cpu_seconds"], 3)
            for name in plain}
        figures["targets"] = {
            "ingest_peak_rss_under_1GiB": figures["ingest"]["peak_rss_bytes"] <= GiB,
            "throughput_at_least_0.8x_each_plain_loop":
                min(figures["throughput_ratio"].values()) >= 0.8}
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(work, ignore_errors=True)
    out = pathlib.Path(FLAGS.out) if FLAGS.out else machine.results_path("ingest_scale")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
