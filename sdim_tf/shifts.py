"""Shift suite: label-preserving corruptions that cameras, scanners and preprocessing produce.

Each corruption maps float32 images [N, H, W, C] in [0, 1] to the same shape and range at a
severity 1..5 (`PARAMETERS[name][severity - 1]`). A rejecting classifier should keep
accuracy on mild shifts and reject rather than err on strong ones; this suite measures that.

The random corruptions draw from `np.random.default_rng(seed + STREAMS[name])`, with the same
draws at every severity (only the parameter scales them), so the output is a function of
(images, name, severity, seed) and a higher severity changes the images more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
from scipy import ndimage

SEVERITIES = (1, 2, 3, 4, 5)
MIDDLE_SEVERITY = 3

# Per-severity parameter of each corruption (what it means is in the function's docstring).
PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # standard deviation
    "shot_noise": (250.0, 100.0, 50.0, 25.0, 12.0),  # photons at intensity 1
    "salt_and_pepper": (0.01, 0.03, 0.06, 0.1, 0.16),  # share of pixels replaced
    "gaussian_blur": (0.5, 0.75, 1.0, 1.5, 2.0),  # kernel standard deviation, pixels
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
    "contrast": (0.75, 0.6, 0.45, 0.3, 0.15),  # factor on the distance to the image mean
    "translate": (1, 2, 3, 4, 6),  # pixels to the right
    "rotate": (5.0, 10.0, 15.0, 20.0, 25.0),  # degrees, direction drawn per image
    "jpeg": (75, 50, 30, 15, 8),  # JPEG quality
    "pixelate": (2, 3, 4, 6, 8),  # block side, pixels
    "occlusion": (4, 8, 12, 16, 20),  # side of the zeroed square, pixels
}
CORRUPTIONS: tuple[str, ...] = tuple(PARAMETERS)

# Fixed per-corruption offsets of the seed (not hash(), which varies between processes); only
# the random corruptions have one.
STREAMS: dict[str, int] = {"gaussian_noise": 1, "shot_noise": 2, "salt_and_pepper": 3,
                           "rotate": 4, "occlusion": 5}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Returns `images` under corruption `name` at `severity`: float32, same shape, in [0, 1]."""
    if name not in PARAMETERS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES or isinstance(severity, bool):
        raise ValueError(f"unknown severity {severity!r}; known: {SEVERITIES}")
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"need images [N, H, W, C], got shape {images.shape}")
    parameter = PARAMETERS[name][severity - 1]
    if name in STREAMS:
        out = _FUNCTIONS[name](images, parameter, np.random.default_rng(seed + STREAMS[name]))
    else:
        out = _FUNCTIONS[name](images, parameter)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor read noise: adds N(0, sigma^2) (float64 draws) to every value."""
    return images + sigma * rng.standard_normal(images.shape)


def shot_noise(images: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    """Photon noise: Poisson(x * photons) / photons, fewer photons at higher severity."""
    return rng.poisson(images.astype(np.float64) * photons) / photons


def salt_and_pepper(images: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Dead and stuck pixels: a share `amount` of pixel sites set to 0 or 1 (all channels)."""
    n, h, w, _ = images.shape
    hit, salt = rng.random((n, h, w, 1)), rng.random((n, h, w, 1))
    return np.where(hit < amount, (salt < 0.5).astype(np.float32), images)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Defocus: a Gaussian filter over height and width (scipy, reflected borders)."""
    return ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="reflect")


def brightness(images: np.ndarray, delta: float) -> np.ndarray:
    """Over-exposure: adds `delta` to every value (clipped at 1)."""
    return images + delta


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
    """Low contrast: (x - m) * factor + m with m the mean of each image over H, W and C."""
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    return (images - mean) * factor + mean


def translate(images: np.ndarray, pixels: int) -> np.ndarray:
    """Misaligned crop: pixel (i, j) moves to (i, j + pixels), the left columns become 0."""
    out = np.zeros_like(images)
    out[:, :, pixels:] = images[:, :, :images.shape[2] - pixels]
    return out


def rotate(images: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Tilted object: bilinear rotation by +-degrees (sign per image), zero fill, same size."""
    signs = np.where(rng.random(len(images)) < 0.5, -1.0, 1.0)
    out = np.empty_like(images)
    for sign in (-1.0, 1.0):
        chosen = signs == sign
        if not chosen.any():
            continue
        out[chosen] = ndimage.rotate(images[chosen], sign * degrees, axes=(1, 2), reshape=False,
                                     order=1, mode="constant", cval=0.0)
    return out


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """Lossy storage: JPEG encode and decode of the uint8-rounded image (TensorFlow codec)."""
    import tensorflow as tf  # only this corruption needs it

    as_uint8 = np.round(images * 255.0).astype(np.uint8)
    channels = images.shape[-1]
    decoded = [tf.io.decode_jpeg(tf.io.encode_jpeg(image, quality=quality), channels=channels)
               for image in as_uint8]
    return np.stack([d.numpy() for d in decoded]).astype(np.float32) / 255.0


def pixelate(images: np.ndarray, block: int) -> np.ndarray:
    """Low resolution: the mean of each block x block cell (smaller at the far edges) repeated
    over the cell, i.e. area downsampling then nearest upsampling."""
    h, w = images.shape[1:3]
    rows, cols = np.arange(0, h, block), np.arange(0, w, block)
    sums = np.add.reduceat(np.add.reduceat(images.astype(np.float64), rows, axis=1), cols, axis=2)
    counts = np.outer(np.diff(np.r_[rows, h]), np.diff(np.r_[cols, w]))[None, :, :, None]
    means = sums / counts
    return means[:, np.arange(h) // block][:, :, np.arange(w) // block]


def occlusion(images: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """Something in front of the object: a zeroed side x side square per image.

    Its centre (row, col) is drawn uniformly per image; the square spans
    [centre - side // 2, + side), shifted inside the image, so it grows with the severity.
    """
    n, h, w, _ = images.shape
    centres = rng.integers(0, (h, w), size=(n, 2))
    tops = np.clip(centres[:, 0] - side // 2, 0, h - side)
    lefts = np.clip(centres[:, 1] - side // 2, 0, w - side)
    out = images.copy()
    for image, top, left in zip(out, tops, lefts, strict=True):
        image[top:top + side, left:left + side] = 0.0
    return out


_FUNCTIONS = {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise,
              "salt_and_pepper": salt_and_pepper, "gaussian_blur": gaussian_blur,
              "brightness": brightness, "contrast": contrast, "translate": translate,
              "rotate": rotate, "jpeg": jpeg, "pixelate": pixelate, "occlusion": occlusion}


def _compute(part: str, compute: Callable[[], dict]) -> dict:
    return compute()


def measure(deployable, images: np.ndarray, labels: np.ndarray, seed: int = 0,
            severities: tuple[int, ...] = SEVERITIES,
            keep: Callable[[str, Callable[[], dict]], dict] = _compute,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """The deployed rule on clean and shifted `images` (float32 [N, H, W, C] in [0, 1]).

    `deployable` has `class_scores(batches)` and `decide(scores)` (a
    `serving.RejectingClassifier`). Per corruption and severity: accuracy, the rejected
    share (and the shares refused as unfamiliar and as ambiguous) and the silent error
    (accepted and wrong, a share of all images); the
    risk-coverage area of the deployed score (lower is better) on clean images and on all
    corruptions at MIDDLE_SEVERITY pooled; `mean_silent_error_middle` averages the
    corruptions at MIDDLE_SEVERITY.

    The class scores come in parts, "clean" and one per corruption ({severity: scores}):
    `keep(part, compute)` returns what `compute()` would, and may return what an earlier,
    killed run kept (the evaluate stage resumes so). `progress(done, total)` is called
    after each part.
    """
    from sdim_tf import data, metrics, rejection  # TensorFlow for the forward pass

    labels = np.asarray(labels)

    def class_scores(batch: np.ndarray) -> np.ndarray:
        return deployable.class_scores(data.image_batches(batch))[0]

    def shifted_scores(name: str) -> dict:
        return {str(s): class_scores(corrupt(images, name, s, seed)) for s in severities}

    def rule(scores: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
        decision = deployable.decide(scores)
        predicted, rejected = decision.class_ids.numpy(), decision.rejected.numpy()
        return ({"accuracy": float((predicted == labels).mean()),
                 "rejected": float(rejected.mean()),
                 "silent_error": metrics.silent_error(predicted, labels, rejected),
                 **{reason: float(getattr(decision, reason).numpy().mean())
                    for reason in (rejection.UNFAMILIAR, rejection.AMBIGUOUS)}},
                decision.score.numpy(), predicted == labels)

    clean, score, correct = rule(keep("clean", lambda: {"scores": class_scores(images)})[
        "scores"])
    result = {"images": int(len(labels)), "seed": seed, "severities": list(severities),
              "parameters": {k: list(v) for k, v in PARAMETERS.items()},
              "clean": clean, "corruptions": {}}
    pooled_scores, pooled_correct = [], []
    report = progress or (lambda done, total: None)
    report(1, 1 + len(CORRUPTIONS))
    for i, name in enumerate(CORRUPTIONS, start=2):
        result["corruptions"][name] = {}
        by_severity = keep(name, functools.partial(shifted_scores, name))
        report(i, 1 + len(CORRUPTIONS))
        for severity in severities:
            figures, shifted_score, shifted_correct = rule(by_severity[str(severity)])
            result["corruptions"][name][str(severity)] = figures
            if severity == MIDDLE_SEVERITY:
                pooled_scores.append(shifted_score)
                pooled_correct.append(shifted_correct)
    curves = {"clean": (score, correct)}
    if pooled_scores:
        curves["shifted_middle"] = (np.concatenate(pooled_scores),
                                    np.concatenate(pooled_correct))
    result["aurc"], result["risk_coverage"] = {}, {}
    for key, (ranked, right) in curves.items():
        curve = metrics.risk_coverage(ranked, right)
        result["aurc"][key] = curve["aurc"]
        grid = np.linspace(0.05, 1.0, 20)  # the curve at 20 coverages, for the report
        at = np.searchsorted(curve["coverage"], grid - 1e-12)
        result["risk_coverage"][key] = {"coverage": grid.round(2).tolist(),
                                        "risk": curve["risk"][at].tolist()}
    if pooled_scores:
        result["mean_silent_error_middle"] = float(np.mean(
            [v[str(MIDDLE_SEVERITY)]["silent_error"] for v in result["corruptions"].values()]))
    return result
