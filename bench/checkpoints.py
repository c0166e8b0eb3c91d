"""What the per-epoch checkpoint benches share: their data flags, the checkpoints in epoch
order, the images (trained, held out, outliers built from them), JSON without inf/NaN."""

from __future__ import annotations

import glob
import math
import os
import pathlib
import re
import sys

import numpy as np
from absl import flags

from sdim_tf import data, outlier_proxies

FLAGS = flags.FLAGS


def define_data_flags(held_out_images: int) -> None:
    """The flags `held_out_data` reads; `held_out_images` is the bench's default."""
    flags.DEFINE_string("data_dir", os.environ.get("SDIM_DATA_DIR"),
                        "Folder holding fashion_mnist/ and mnist/ IDX files.")
    flags.DEFINE_integer("trained_images", 55000, "The run trained on the first N training "
                         "images; the rest are held out.")
    flags.DEFINE_integer("held_out_images", held_out_images, "Held-out images: the N "
                         "training images after the first --trained_images.")
    flags.DEFINE_integer("fit_images", 5000, "Trained images the tied Gaussians are fitted "
                         "on, evenly strided over the first --trained_images.")
    flags.DEFINE_integer("outlier_images", 1000, "First N held-out images each outlier set is "
                         "built from (proxy and part outliers).")
    flags.DEFINE_integer("seed", 0, "Outlier seed.")
    flags.DEFINE_integer("batch_size", 500, "Images per forward pass.")


def held_out_data() -> tuple[tuple, tuple, dict]:
    """(fit, held_out, outliers) from the data flags: Fashion-MNIST (images, labels) the
    Gaussians are fitted on and held out, and the outlier sets built from held-out images.
    Exits with a message on flags that cannot be met."""
    trained, held = FLAGS.trained_images, FLAGS.held_out_images
    if not 0 < FLAGS.fit_images <= trained:
        sys.exit(f"error: --fit_images must be in [1, {trained}], got {FLAGS.fit_images}")
    if not 0 < FLAGS.outlier_images <= held:
        sys.exit(f"error: --outlier_images must be in [1, {held}], got {FLAGS.outlier_images}")
    fit_index = np.arange(FLAGS.fit_images) * (trained // FLAGS.fit_images)
    fit = images_of("fashion_mnist", "train", fit_index, data_dir=FLAGS.data_dir)
    held_out = images_of("fashion_mnist", "train", np.arange(trained, trained + held),
                         data_dir=FLAGS.data_dir)
    if len(held_out[1]) != held:
        sys.exit(f"error: fewer than {trained + held} Fashion-MNIST training images")
    sources = (held_out[0][:FLAGS.outlier_images], held_out[1][:FLAGS.outlier_images])
    built = outlier_proxies.built_outliers(*sources, seed=FLAGS.seed)
    return fit, held_out, built


def epoch_of(path: str) -> int:
    match = re.search(r"epoch_(\d+)", pathlib.Path(path).name)
    if not match:
        raise ValueError(f"{path}: no epoch_<k> in its name")
    return int(match.group(1))


def in_epoch_order(pattern: str | None, limit: int = 0, epochs: str = "") -> list[str]:
    """The checkpoints matching `pattern` (epoch_<k>.keras), by epoch; only `epochs` (comma
    separated) if given, only the first `limit` if > 0. Exits with a message on none."""
    if not pattern:
        sys.exit("error: --checkpoints is required")
    paths = sorted(glob.glob(pattern), key=epoch_of)
    if epochs:
        wanted = {int(e) for e in epochs.split(",") if e.strip()}
        paths = [p for p in paths if epoch_of(p) in wanted]
    if limit:
        paths = paths[:limit]
    if not paths:
        sys.exit(f"error: no checkpoint matches {pattern}" + (f" at epochs {epochs}" if epochs
                                                             else ""))
    return paths


def images_of(name: str, split: str, index=None, *,
              data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, 32, 32, C] in [0, 1] and labels, of the rows `index` (all if None)."""
    images, labels = data.load_split(name, split, data_dir)
    if index is not None:
        images, labels = images[index], labels[index]
    return data.preprocess(images).numpy(), np.asarray(labels, np.int64)


def finite(value):
    """JSON has no inf/NaN: they become null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
