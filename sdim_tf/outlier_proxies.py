"""Inputs a rejecting classifier must refuse, made from in-distribution images, to choose
rejection settings without OOD data (selection may look at these, never at the real OOD test
sets of `sdim_tf.ood_data`, kept for the final measure):

- `proxy_outliers`: one in-distribution image destroyed (flipped, inverted, permuted).
- `part_outliers`: parts of in-distribution images of different classes put together, so the
  result looks locally in-distribution but is no class.
"""

from __future__ import annotations

import numpy as np

from sdim_tf.outliers import quadrant_mosaics

PART_OUTLIERS = ("halves", "quadrants", "blend", "overlay")
PART_CLASSES = 4  # pairwise different classes per part outlier (part_partners)


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


def part_partners(labels: np.ndarray, seed: int = 0, count: int = PART_CLASSES) -> np.ndarray:
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


def built_outliers(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """The proxy outliers of `images` and, where they hold PART_CLASSES classes, their part
    outliers."""
    built = proxy_outliers(images, seed)
    if len(np.unique(labels)) >= PART_CLASSES:
        built.update(part_outliers(images, labels, seed=seed))
    return built
