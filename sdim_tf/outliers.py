"""Inputs a rejecting classifier must refuse.

Built from in-distribution images, to choose rejection settings without OOD data (selection
may look at these, never at the real OOD test sets, kept for the final measure):

- `proxy_outliers`: one in-distribution image destroyed (flipped, inverted, permuted).
- `part_outliers`: parts of in-distribution images of different classes put together, so the
  result looks locally in-distribution but is no class.

And the evaluation's OOD sets (`ood_sets`): the paired dataset of the paper (Fashion-MNIST
<-> MNIST, CIFAR10 -> SVHN) when it is local, and synthetic noise and constant images.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from sdim_tf import data

OOD_PAIRS = {"fashion_mnist": ["mnist"], "mnist": ["fashion_mnist"], "cifar10": ["svhn_cropped"]}
SYNTHETIC = ("uniform_noise", "gaussian_noise", "constant")
SYNTHETIC_SIZE = 1000

PART_OUTLIERS = ("halves", "quadrants", "blend", "overlay")


def proxy_outliers(images: np.ndarray, seed: int = 0) -> dict:
    """Outliers made from in-distribution images: what selection may look at."""
    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    permutation = rng.permutation(h * w)
    tile = h // 4
    grid = images.reshape(n, 4, tile, 4, tile, c).transpose(0, 1, 3, 2, 4, 5)
    grid = grid.reshape(n, 16, tile, tile, c)[:, rng.permutation(16)]
    shuffled = grid.reshape(n, 4, 4, tile, tile, c).transpose(0, 1, 3, 2, 4, 5)
    return {"flipped": images[:, ::-1], "inverted": 1.0 - images,
            "pixel_permuted": images.reshape(n, h * w, c)[:, permutation].reshape(images.shape),
            "tile_shuffled": shuffled.reshape(images.shape)}


def part_partners(labels: np.ndarray, seed: int = 0, count: int = 4) -> np.ndarray:
    """[N, count] image indices: column 0 is the image itself, the others partners.

    Column k starts as a seeded permutation; entries whose label equals the label of an
    earlier column are re-drawn uniformly among the images of the still-unused classes, so
    each row holds `count` images of pairwise different classes.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if len(np.unique(labels)) < count:
        raise ValueError(f"part outliers need images of at least {count} classes, "
                         f"got {len(np.unique(labels))}")
    rng = np.random.default_rng(seed)
    partners = np.empty((n, count), np.int64)
    partners[:, 0] = np.arange(n)
    for k in range(1, count):
        column = rng.permutation(n)
        used = labels[partners[:, :k]]
        for i in np.flatnonzero((labels[column][:, None] == used).any(axis=1)):
            # Per row, so the re-draw always succeeds (a valid candidate exists).
            column[i] = rng.choice(np.flatnonzero(~np.isin(labels, used[i])))
        partners[:, k] = column
    return partners


def part_outliers(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Outliers of in-distribution parts that are no class; float32 [N, H, W, C] in [0, 1].

    With partners a, b, c, d of pairwise different classes (`part_partners`):

    - halves: the top H // 2 rows of a over the bottom rows of b.
    - quadrants: a 2x2 mosaic, top-left of a, top-right of b, bottom-left of c, bottom-right
      of d (split at H // 2 and W // 2).
    - blend: the average 0.5 * a + 0.5 * b.
    - overlay: the pixelwise maximum of a and b (two objects drawn over each other).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) != len(np.asarray(labels).reshape(-1)):
        raise ValueError(f"need images [N, H, W, C] and N labels, got {images.shape} and "
                         f"{np.shape(labels)}")
    partners = part_partners(labels, seed)
    a, b, c, d = (images[partners[:, k]] for k in range(4))
    h = images.shape[1] // 2
    halves = a.copy()
    halves[:, h:] = b[:, h:]
    result = {"halves": halves, "quadrants": quadrant_mosaics(a, b, c, d).numpy(),
              "blend": 0.5 * a + 0.5 * b, "overlay": np.maximum(a, b)}
    return {name: np.clip(result[name], 0.0, 1.0).astype(np.float32) for name in PART_OUTLIERS}


def batch_mosaics(images: tf.Tensor, count) -> tf.Tensor:
    """In-graph 2x2 mosaics for training, [count, H, W, C]: mosaic i takes its top-left
    quadrant from image i and the top-right, bottom-left and bottom-right ones from images
    i+1, i+2, i+3 of the batch (cyclically) -- the `quadrants` part outliers with the batch's
    neighbours as partners (their classes may repeat)."""
    return quadrant_mosaics(*(tf.roll(images, -k, axis=0)[:count] for k in range(4)))


def quadrant_mosaics(a, b, c, d) -> tf.Tensor:
    """2x2 mosaics [N, H, W, C]: top-left of a, top-right of b, bottom-left of c,
    bottom-right of d, split at H // 2 and W // 2."""
    h, w = a.shape[1] // 2, a.shape[2] // 2
    top = tf.concat([a[:, :h, :w], b[:, :h, w:]], axis=2)
    bottom = tf.concat([c[:, h:, :w], d[:, h:, w:]], axis=2)
    return tf.concat([top, bottom], axis=1)


def synthetic_images(kind: str, shape: tuple[int, int, int], n: int, seed: int) -> np.ndarray:
    """float32 [n, 32, 32, C] in [0, 1]: illegal inputs no training image resembles."""
    rng = np.random.default_rng(seed)
    size = (n, data.IMAGE_SIZE, data.IMAGE_SIZE, shape[-1])
    if kind == "uniform_noise":
        return rng.random(size, np.float32)
    if kind == "gaussian_noise":
        return np.clip(rng.normal(0.5, 0.25, size), 0, 1).astype(np.float32)
    if kind == "constant":
        return np.broadcast_to(np.linspace(0, 1, n, dtype=np.float32)[:, None, None, None],
                               size).copy()
    raise ValueError(f"unknown synthetic set {kind!r}")


def ood_sets(dataset: str, shape: tuple[int, int, int], data_dir: Optional[str] = None,
             seed: int = 0) -> tuple[dict, dict]:
    """The evaluation's OOD sets for a model of `dataset` with input `shape`:
    ({name: images (uint8 source or float32 [0, 1])}, {unavailable name: why})."""
    sets, missing = {}, {}
    for name in OOD_PAIRS.get(dataset, []):
        try:
            images, _ = data.load_split(name, "test", data_dir, allow_download=False)
        except data.DataError as e:
            missing[name] = str(e)
            continue
        if images.shape[-1] != shape[-1]:
            missing[name] = f"{images.shape[-1]} channels, the model takes {shape[-1]}"
            continue
        sets[name] = images
    for kind in SYNTHETIC:
        sets[kind] = synthetic_images(kind, shape, SYNTHETIC_SIZE, seed)
    return sets, missing
