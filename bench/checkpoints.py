"""What the per-epoch checkpoint benches share: the checkpoints in epoch order, the images,
JSON without inf/NaN."""

from __future__ import annotations

import glob
import math
import pathlib
import re
import sys

import numpy as np

from sdim_tf import data


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
