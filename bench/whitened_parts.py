"""Where images lie in the whitened space of tied Gaussians: the figures of
bench.decay_geometry, apart from its flags so that tests can import them."""

from __future__ import annotations

import numpy as np

from sdim_tf import density, metrics


def geometry(fit_features: np.ndarray, fit_labels: np.ndarray, sets: dict,
             num_classes: int, top_share: float = 0.1) -> dict:
    """The per-layer figures of the module docstring. `sets` maps names to features [N, d];
    its first entry is the in-distribution reference of the AUROCs."""
    stats = density.TiedGaussianStats(num_classes, fit_features.shape[1])
    stats.update(fit_features, fit_labels)
    means, factor = stats.fit()
    dim = means.shape[1]
    precision = factor @ factor.T
    inverse_variances, directions = np.linalg.eigh(precision)  # ascending: most variance first
    variances = 1.0 / inverse_variances
    top = max(1, int(round(top_share * dim)))
    whitened_means = means @ factor
    basis = density.span_basis(whitened_means).T  # [C-1, d]
    parts = {}
    for name, x in sets.items():
        whitened = np.asarray(x, np.float64) @ factor
        distances = ((whitened[:, None] - whitened_means[None]) ** 2).sum(-1)
        nearest = distances.argmin(1)
        deviation = np.asarray(x, np.float64) - means[nearest]
        residual = deviation @ factor  # [N, d]; squared length = Mahalanobis distance
        full = (residual ** 2).sum(1)
        between = ((residual @ basis.T) ** 2).sum(1)
        # along the covariance's eigenvectors (most variance first), in standard deviations
        along = (deviation @ directions) * np.sqrt(inverse_variances)
        k = len(basis)
        # both parts standardised by their chi-square mean and spread, then summed
        split = (between - k) / np.sqrt(2 * k) + (full - between - (dim - k)) / np.sqrt(
            2 * (dim - k))
        parts[name] = {"full": full, "between": between, "rest": full - between, "split": split,
                       "most_variance": (along[:, :top] ** 2).sum(1) / top,
                       "least_variance": (along[:, dim // 2:] ** 2).sum(1) / (dim - dim // 2)}
    reference = next(iter(parts.values()))
    return {
        "dim": dim,
        "effective_dim": float(variances.sum() ** 2 / (variances ** 2).sum()),
        "class_mean_spread": float(((whitened_means - whitened_means.mean(0)) ** 2)
                                   .sum(1).mean()),
        "sets": {name: {**{f"median_{k}": float(np.median(v)) for k, v in p.items()},
                        **({} if p is reference else {
                            f"auroc_{k}": metrics.auroc(-reference[k], -p[k]) for k in p})}
                 for name, p in parts.items()}}
