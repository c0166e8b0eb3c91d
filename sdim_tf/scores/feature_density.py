"""Tied Gaussians fitted after training on encoder layers (`sdim_tf.density`), kept in
density.npz."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from sdim_tf import density, temporaries
from sdim_tf.scores.registry import register


@register
@dataclasses.dataclass(frozen=True)
class FeatureDensityScore:
    """`density.FeatureDensity` on `layers` (`split`: two terms per layer), fitted on the
    training images without augmentation."""

    name = "feature_density"
    # Scores standardised across classes: one threshold rejects more outliers at the same
    # rate on held-out images (docs/results.md).
    default_grouping = "shared"
    report_note = ("tied Gaussians on encoder layers fitted after training (sdim_tf.density), "
                   "the predicted class's summed standardised score. Columns named after "
                   "log-likelihoods hold this score.")
    FILE = "density.npz"

    layers: tuple[str, ...] = density.DEFAULT_LAYERS
    split: bool = density.DEFAULT_SPLIT
    # the pooled covariance's estimator per layer (density.choose_covariance); "auto" keeps
    # the sample covariance from density.SHRINK_BELOW x d training images up
    covariance: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "split", bool(self.split))
        unknown = sorted(set(self.layers) - set(density.LAYERS))
        if unknown or not self.layers:
            raise ValueError(f"layers must be a non-empty subset of "
                             f"{', '.join(density.LAYERS)}; got {list(self.layers)}")
        if self.covariance not in density.COVARIANCES:
            raise ValueError(f"covariance must be one of {', '.join(density.COVARIANCES)}; "
                             f"got {self.covariance!r}")

    @property
    def description(self) -> str:
        return ("the predicted class's summed standardised tied-Gaussian score on the encoder "
                f"layers {', '.join(self.layers)}{' (split terms)' if self.split else ''} "
                "(sdim_tf.density; output class_scores)")

    def settings(self) -> dict:
        return {"layers": list(self.layers), "split": self.split,
                "covariance": self.covariance}

    def scorer(self, model) -> density.FeatureDensity:
        """Unfitted: identity precision and zero means until `fit` or `load`."""
        return density.FeatureDensity(model, model.config["num_classes"], self.layers,
                                      self.split)

    def fit(self, model, batches=None, progress=None) -> density.FeatureDensity:
        if batches is None:
            raise ValueError("feature_density is fitted on training images: pass batches")
        scorer = self.scorer(model)
        scorer.fit_features(batches, progress=progress, covariance=self.covariance)
        return scorer

    def save(self, scorer, folder) -> list[str]:
        """density.npz (no pickle), written under another name and renamed into place."""
        temporaries.replace_atomically(pathlib.Path(folder) / self.FILE,
                                       lambda f: np.savez(f, **scorer.parameters()), ".npz")
        return [self.FILE]

    def load(self, model, folder) -> density.FeatureDensity:
        path = pathlib.Path(folder) / self.FILE
        try:
            with np.load(path, allow_pickle=False) as saved:
                parameters = {k: saved[k] for k in saved.files}
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} cannot be read ({e})") from None
        scorer = self.scorer(model)
        for layer, dim in scorer.density_scores.dims.items():
            means = parameters.get(f"{layer}/means")
            factor = parameters.get(f"{layer}/precision_factor")
            if (means is None or factor is None or means.shape != (scorer.num_classes, dim)
                    or factor.shape != (dim, dim)
                    or not (np.isfinite(means).all() and np.isfinite(factor).all())):
                raise ValueError(f"{path}: layer {layer} lacks finite means "
                                 f"[{scorer.num_classes}, {dim}] and a precision factor "
                                 f"[{dim}, {dim}]")
        scorer.load_parameters(parameters)
        return scorer
