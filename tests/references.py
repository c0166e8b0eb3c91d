"""Independent references the tests compare the library against: numpy formulas, and
TensorFlow's own `saved_model_cli`."""

import pathlib
import subprocess
import sys

import numpy as np


def numpy_scores(features: dict, labels, queries: dict, num_classes: int, ridge: float,
                 split: bool = False):
    """sum over layers of (d - squared Mahalanobis distance) / sqrt(2d), by the textbook.
    `split`: the distance's part b in the span of the class-mean differences M, by the
    projection in the precision's metric, P^T M (M^T P M)^+ M^T P, and the rest m - b, each
    standardised by its own degrees of freedom (C-1 and d-C+1)."""
    total = 0.0
    for name, x in features.items():
        x = x.astype(np.float64)
        means = np.stack([x[labels == c].mean(0) for c in range(num_classes)])
        covariance = np.cov((x - means[labels]).T, bias=True)
        d = len(covariance)
        covariance += ridge * np.trace(covariance) / d * np.eye(d)
        precision = np.linalg.inv(covariance)
        q = queries[name].astype(np.float64)
        distances = np.stack([np.einsum("nd,de,ne->n", q - means[c], precision, q - means[c])
                              for c in range(num_classes)], 1)
        if not split:
            total = total + (d - distances) / np.sqrt(2 * d)
            continue
        m = (means - means.mean(0)).T  # [d, C], rank C-1
        projection = precision @ m @ np.linalg.pinv(m.T @ precision @ m) @ m.T @ precision
        between = np.stack([np.einsum("nd,de,ne->n", q - means[c], projection, q - means[c])
                            for c in range(num_classes)], 1)
        k = num_classes - 1
        total = total + (k - between) / np.sqrt(2 * k) + (
            d - k - (distances - between)) / np.sqrt(2 * (d - k))
    return total


def whitened_scores(x, means, factor, split: bool = False):
    """One layer's term by the unfolded formula, float64: whiten the deviations from the mean
    of the class means, then the squared distances to the whitened class means; `split`:
    their projection onto the span of the centred whitened means and the rest."""
    center = means.mean(0)
    whitened, whitened_means = (x - center) @ factor, (means - center) @ factor
    d, k = factor.shape[0], min(len(means) - 1, factor.shape[0])
    distances = ((whitened[:, None] - whitened_means[None]) ** 2).sum(-1)
    if not split:
        return (d - distances) / np.sqrt(2 * d)
    basis = np.linalg.svd(whitened_means - whitened_means.mean(0))[2][:k].T
    within = whitened @ basis
    between = ((within[:, None] - (whitened_means @ basis)[None]) ** 2).sum(-1)
    rest = ((whitened - within @ basis.T) ** 2).sum(-1, keepdims=True)
    return (k - between) / np.sqrt(2 * k) + (d - k - rest) / np.sqrt(2 * (d - k))


def saved_model_cli_answers(model_dir, images: np.ndarray, tmp_path: pathlib.Path) -> str:
    """`saved_model_cli run` of serving_default on float `images`: its printed answer, after
    asserting that it answered (exit code 0, `rejected` and `class_ids` printed)."""
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    np.save(tmp_path / "x.npy", images)
    answered = subprocess.run(
        [str(cli), "run", "--dir", str(model_dir), "--tag_set", "serve", "--signature_def",
         "serving_default", "--inputs", f"images={tmp_path / 'x.npy'}"],
        capture_output=True, text=True, timeout=300)
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert "rejected" in answered.stdout and "class_ids" in answered.stdout
    return answered.stdout


def batch_norm_inference(x, dy, gamma, beta, mean, variance, epsilon):
    """Inference-mode batch norm, float64, channels last: (y, dx, dgamma, dbeta) of
    y = gamma (x - mean) / sqrt(variance + epsilon) + beta for the upstream gradient `dy`."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = tuple(range(x.ndim - 1))
    normalized = (x - mean) / np.sqrt(variance + epsilon)
    return (gamma * normalized + beta, dy * gamma / np.sqrt(variance + epsilon),
            (dy * normalized).sum(axes), dy.sum(axes))


def batch_norm_training(x, dy, gamma, beta, epsilon):
    """Training-mode batch norm by the textbook (Ioffe and Szegedy, 2015), float64, over all
    axes but the last: (y, batch mean, biased batch variance, dx, dgamma, dbeta) for the
    upstream gradient `dy`."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = tuple(range(x.ndim - 1))
    mean, variance = x.mean(axes), x.var(axes)
    normalized = (x - mean) / np.sqrt(variance + epsilon)
    dx = gamma / np.sqrt(variance + epsilon) * (
        dy - dy.mean(axes) - normalized * (dy * normalized).mean(axes))
    return (gamma * normalized + beta, mean, variance, dx, (dy * normalized).sum(axes),
            dy.sum(axes))
