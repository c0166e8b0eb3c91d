"""LocalSearch (Narodytska & Kasiviswanathan 2016, Algorithm 3): a black-box attack that
perturbs a few pixels at a time, chosen by probing candidates one by one.

Pixels live in the [-1/2, 1/2]-centred scale of the input bounds (the paper's); a state is
one image in that scale, a pixel a (row, column) pair.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def local_search(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                 labels: np.ndarray, *, rounds: int = 150, p: float = 10.0, r: float = 1.5,
                 d: int = 5, t: int = 5, k: int = 1, initial_fraction: float = 0.1,
                 max_candidates: int = 128,
                 bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                 progress: Callable[[int, int], None] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """LocalSearch, untargeted, black-box.

    Each round scores candidate pixels by how much setting them to p * sign(pixel) (in the
    [-1/2, 1/2]-centred scale) lowers the true class, multiplies the t best by r with cyclic
    wrap-around in bounds, stops when the true class leaves the top k, and takes the next
    candidates from the (2d+1)^2 neighbourhoods of the perturbed pixels. The score is the
    log-softmax of the true class: the paper's probability, without float ties at 1.0.
    As in Foolbox, each round scores a random subset of at most `max_candidates` pixels.
    `predict` maps images [B, H, W, C] to logits [B, classes]. `progress(round, unfooled)`,
    if given, is called after every round. Returns (adversarial, success); a failed image
    comes back unchanged.
    """
    low, high = bounds
    centre, scale = (low + high) / 2, high - low

    def to_images(s):
        return (s * scale + centre).astype(np.float32)

    rng = np.random.default_rng(seed)
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    n, h, w = images.shape[:3]
    states = (images - centre) / scale
    adversarial, success = images.copy(), np.zeros(n, bool)
    candidates = [_random_pixels(rng, (h, w), initial_fraction) for _ in range(n)]
    active = list(range(n))
    for done in range(1, rounds + 1):
        if not active:
            break
        for i in active:
            candidates[i] = _at_most(rng, candidates[i], max_candidates)
        chosen = _perturb_best(lambda s: predict(to_images(s)), states, active, candidates,
                               labels, p, r, t)
        fooled = _fooled(predict(to_images(states[active])), labels[active], k)
        still = []
        for i, out in zip(active, fooled, strict=True):
            if out:
                success[i] = True
                adversarial[i] = to_images(states[i])
            else:
                candidates[i] = _neighbourhood(chosen[i], d, (h, w))
                still.append(i)
        active = still
        if progress is not None:
            progress(done, len(active))
    return adversarial, success


def _random_pixels(rng, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """[round(fraction * H * W) (at least 1), 2] distinct pixels: the first candidates."""
    count = max(1, int(round(fraction * shape[0] * shape[1])))
    return np.stack(np.unravel_index(rng.choice(shape[0] * shape[1], count, replace=False),
                                     shape), 1)


def _at_most(rng, pixels: np.ndarray, limit: int) -> np.ndarray:
    """A random subset of `limit` pixels when there are more."""
    if len(pixels) <= limit:
        return pixels
    return pixels[rng.choice(len(pixels), limit, replace=False)]


def _probes(state: np.ndarray, pixels: np.ndarray, p: float) -> np.ndarray:
    """One copy of `state` per pixel, that pixel set to p * its sign: [len(pixels), H, W, C]."""
    batch = np.repeat(state[None], len(pixels), 0)
    rows, cols = pixels[:, 0], pixels[:, 1]
    batch[np.arange(len(rows)), rows, cols] = p * np.sign(state[rows, cols])
    return batch


def _true_class_score(logits: np.ndarray, label: int) -> np.ndarray:
    """log-softmax of the true class, per row."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(1, keepdims=True)
    return logits[:, label] - top[:, 0] - np.log(np.exp(logits - top).sum(1))


def _multiply_cyclic(state: np.ndarray, pixels: np.ndarray, r: float) -> None:
    """state[pixels] *= r, wrapped back into [-1/2, 1/2] (in place)."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    values = r * state[rows, cols]
    state[rows, cols] = np.where(values < -0.5, values + 1,
                                 np.where(values > 0.5, values - 1, values))


def _perturb_best(predict_states, states: np.ndarray, active: list[int], candidates: list,
                  labels: np.ndarray, p: float, r: float, t: int) -> dict[int, np.ndarray]:
    """One round's perturbation: every active image's candidates probed in one batch, then
    its t pixels whose probe lowers the true class most multiplied by r (`states` in place).
    Returns those pixels per image."""
    probes = [_probes(states[i], candidates[i], p) for i in active]
    scores = predict_states(np.concatenate(probes))
    chosen, offset = {}, 0
    for i, batch in zip(active, probes, strict=True):
        score = _true_class_score(scores[offset:offset + len(batch)], labels[i])
        offset += len(batch)
        chosen[i] = candidates[i][np.argsort(score, kind="stable")[:t]]
        _multiply_cyclic(states[i], chosen[i], r)
    return chosen


def _fooled(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [B]: the true class is not among the top k."""
    ranks = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    return np.array([label not in top for label, top in zip(labels, ranks, strict=True)], bool)


def _neighbourhood(pixels: np.ndarray, d: int, shape: tuple[int, int]) -> np.ndarray:
    """The distinct pixels inside the image within the (2d+1)^2 squares around `pixels`."""
    offsets = np.arange(-d, d + 1)
    window = np.stack(np.meshgrid(offsets, offsets, indexing="ij"), -1)  # [2d+1, 2d+1, 2]
    near = (pixels[:, None, None, :] + window).reshape(-1, 2)
    inside = ((near[:, 0] >= 0) & (near[:, 0] < shape[0])
              & (near[:, 1] >= 0) & (near[:, 1] < shape[1]))
    return np.unique(near[inside], axis=0)
