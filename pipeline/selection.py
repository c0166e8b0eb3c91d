"""Which training images the model trains on and which calibration holds out.

A selection is an `Examples.dataset` selection of the training split: {"skip", "limit"} (a
range in file order) or {"indices"} (sorted positions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.sections import ConfigError

# --validation_fraction holds out at least this many images of a class (half of a class of
# fewer than twice as many), so that small folders still calibrate on every class.
HELD_OUT_MIN = 5


def split_examples(training, num_train: int, labels: Callable[[], np.ndarray]
                   ) -> tuple[dict, dict | None]:
    """(the selection the model trains on, the one held out for calibration or None) under
    the `config.TrainConfig` `training`. `labels()`: the training labels in file order, read
    for --validation_fraction only."""
    if training.validation_fraction:
        held = per_class_held_out(labels(), training.validation_fraction, training.seed)
        trained = np.setdiff1d(np.arange(num_train), held)
        if training.train_limit and training.train_limit < len(trained):
            trained = np.sort(np.random.default_rng(training.seed).permutation(
                trained)[:training.train_limit])
        return {"indices": trained.tolist()}, {"indices": held.tolist()}
    v = training.validation_split
    available = num_train - v
    if available < 2:
        raise ConfigError(f"--validation_split={v} leaves {max(available, 0)} of the "
                          f"{num_train} training images to train on; hold out fewer")
    trained = {"skip": 0, "limit": min(available, training.train_limit or available)}
    return trained, ({"skip": available, "limit": v} if v else None)


def size(selection: dict) -> int:
    """The number of images of a selection."""
    return len(selection["indices"]) if "indices" in selection else int(selection["limit"])


def first(selection: dict, count: int) -> dict:
    """The first `count` images of a selection."""
    if "indices" in selection:
        return {"indices": selection["indices"][:count]}
    return {"skip": selection["skip"], "limit": min(count, selection["limit"])}


def per_class_held_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the held-out images: round(fraction x n_c) of each class's n_c
    (at least min(HELD_OUT_MIN, n_c // 2), at most n_c - 1), drawn with `seed`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        count = min(max(int(round(fraction * n)), min(HELD_OUT_MIN, n // 2)), n - 1)
        held.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)


def subset_refusal(train_limit: int | None, export_dir: str | None,
                   export_subset: bool) -> str | None:
    """Why a run may not publish into `export_dir`, or None: a model trained on
    --train_limit images becomes a serving directory's version only under --export_subset."""
    if not (train_limit and export_dir and not export_subset):
        return None
    return (f"--train_limit={train_limit} trains on a subset, which --export_dir={export_dir} "
            "would serve as its next version: pass --export_subset to publish it there, or "
            "drop --export_dir (the model then goes to <run_dir>/saved_models)")
