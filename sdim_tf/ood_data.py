"""The evaluation's OOD sets: the paired dataset of the paper (Fashion-MNIST <-> MNIST,
CIFAR10 -> SVHN) when it is local, and synthetic noise and constant images.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sdim_tf import data

OOD_PAIRS = {"fashion_mnist": ["mnist"], "mnist": ["fashion_mnist"], "cifar10": ["svhn_cropped"]}
SYNTHETIC = ("uniform_noise", "gaussian_noise", "constant")
SYNTHETIC_SIZE = 1000


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
