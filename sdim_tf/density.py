"""Post-hoc class-conditional densities on the trained encoder's features.

The rejection score of the paper is the predicted class's log p(z|c) under the learned
diagonal Gaussians. `FeatureDensity` instead fits, after training and on the training set,
one Gaussian per class with a covariance shared by the classes (LDA; Lee et al. 2018's
Mahalanobis score) on each of several layers of the encoder, and sums the layers' scores,
each standardised by its chi-square mean and spread. Its output has the paper's shape,
per-class scores [N, C], so that calibration, the decision rule and serving are unchanged.

`split=True` scores each layer as two terms: its whitened deviation from a class mean within
the span of the class means (C-1 directions) and outside it (the rest, the same for every
class), each standardised by its own chi-square mean and spread. With training, outliers'
features become in-distribution-like outside that span while staying far within it
(docs/results.md, "Why rejection decays"); in the joint distance the rest's d-C+1 directions
drown the C-1.

Few images for a layer's dimension (your own folders of a few hundred images against the
default layers' 1792 dimensions) make the sample covariance's inverse fit the training
images alone; `covariance="auto"` then shrinks it (OAS, from the same streaming sums) when
that predicts held-out training images better (`choose_covariance`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

LAYERS = ("stage1", "stage2", "stage3", "stage4", "quad1", "quad2", "quad3", "quad4", "head",
          "z")
# Selected on held-out images and outliers built from them, at epochs 10, 20 and 50 of the
# default run (docs/results.md, "Quadrant features"); before: stage3,stage4,head (chosen on
# epochs 1-25), and head alone.
DEFAULT_LAYERS = ("quad3", "quad4", "head")
# Split terms: selected on held-out images and outliers built from them at epochs 10, 20 and
# 50 of the default run (docs/results.md, "Why rejection decays").
DEFAULT_SPLIT = True
# Marks a layer set scored with split terms (the monitor's layer sets, their score names).
SPLIT = "split"
# The pooled covariance's estimators, and "auto" (`choose_covariance`): the sample one from
# SHRINK_BELOW x d images up, OAS below d, else the better on held-out folds of the training
# images. 90 images of 3 classes on the default layers (1792 dimensions) fitted with the
# sample covariance scored new images near -1e7 against +10 for the fitted ones; OAS
# shrinkage brought them to about -10.
ESTIMATORS = ("sample", "oas")
COVARIANCES = ("auto", *ESTIMATORS)
SHRINK_BELOW = 10
FOLDS = 5


class TiedGaussianStats:
    """Streaming sums for the class means and the pooled (shared) covariance of one layer."""

    def __init__(self, num_classes: int, dim: int):
        self.counts = np.zeros(num_classes)
        self.sums = np.zeros((num_classes, dim))
        self.outer = np.zeros((dim, dim))

    def update(self, features: np.ndarray, labels: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        self.counts += np.bincount(labels, minlength=len(self.counts))
        np.add.at(self.sums, labels, x)
        self.outer += x.T @ x

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())

    def minus(self, part: TiedGaussianStats) -> TiedGaussianStats:
        """The sums of the images not in `part` (a subset of these)."""
        rest = TiedGaussianStats(len(self.counts), len(self.outer))
        rest.counts, rest.sums = self.counts - part.counts, self.sums - part.sums
        rest.outer = self.outer - part.outer
        return rest

    def fit(self, ridge: float = 1e-6, covariance: str = "sample"
            ) -> tuple[np.ndarray, np.ndarray]:
        """(means [C, d], precision Cholesky factor L [d, d]: precision = L L^T).

        `covariance`: "sample", the pooled sample covariance, or "oas", shrunk towards a
        multiple of the identity (`oas_shrinkage`). The covariance then gets `ridge` x its
        mean variance on the diagonal: pooled ReLU features can have channels that never
        fire, whose variance is 0.
        """
        means, covariance = self.covariance(ridge, covariance)
        precision = np.linalg.inv(covariance)
        precision = (precision + precision.T) / 2
        return means, np.linalg.cholesky(precision)

    def covariance(self, ridge: float = 1e-6, covariance: str = "sample"
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(means [C, d], the covariance `fit` inverts [d, d])."""
        if covariance not in ESTIMATORS:
            raise ValueError(f"covariance must be one of {', '.join(ESTIMATORS)}, got "
                             f"{covariance!r}")
        if (self.counts == 0).any():
            missing = np.flatnonzero(self.counts == 0).tolist()
            raise ValueError(f"no training sample of class(es) {missing}: cannot fit their mean")
        means = self.sums / self.counts[:, None]
        n = self.counts.sum()
        pooled = (self.outer - (means * self.counts[:, None]).T @ means) / n
        if covariance == "oas":
            pooled = shrink(pooled, oas_shrinkage(pooled, n))
        dim = len(pooled)
        pooled += ridge * max(np.trace(pooled) / dim, 1e-12) * np.eye(dim)
        return means, pooled

    def scatter(self, means: np.ndarray) -> np.ndarray:
        """[d, d]: the sum over these images of (x - mu_label)(x - mu_label)^T for other class
        means `means`, from the sums alone (no second pass over the images)."""
        return (self.outer - self.sums.T @ means - means.T @ self.sums
                + (means * self.counts[:, None]).T @ means)


def oas_shrinkage(covariance: np.ndarray, n: float) -> float:
    """Oracle Approximating Shrinkage (Chen et al. 2010, eq. 23, as scikit-learn's OAS): the
    weight s of mu I in (1 - s) S + s mu I, mu = tr(S) / d, for the sample covariance S of n
    images; from tr(S) and tr(S^2) alone."""
    dim = len(covariance)
    mu = np.trace(covariance) / dim
    mean_square = np.mean(covariance**2)  # tr(S^2) / d^2
    denominator = (n + 1) * (mean_square - mu**2 / dim)
    return 1.0 if denominator == 0 else float(min((mean_square + mu**2) / denominator, 1.0))


def shrink(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    """(1 - shrinkage) S + shrinkage tr(S) / d I."""
    dim = len(covariance)
    shrunk = (1.0 - shrinkage) * covariance
    shrunk[np.diag_indices(dim)] += shrinkage * np.trace(covariance) / dim
    return shrunk


def choose_covariance(stats: TiedGaussianStats, folds: Sequence[TiedGaussianStats] | None,
                      ridge: float = 1e-6, covariance: str = "auto") -> dict:
    """The covariance estimator of one layer and why, as the fit records it.

    "auto": the sample covariance from SHRINK_BELOW x d images up (its inverse is then
    stable); OAS for fewer images than dimensions (the sample covariance is singular);
    between, of "sample" and "oas" the one whose fit on the other folds gives the `folds`'
    images (a partition of the fitted ones) the higher mean log-density.
    """
    n, dim = stats.num_images, len(stats.outer)
    record = {"images": n, "dimensions": dim}
    if covariance != "auto":
        chosen, why = covariance, "set by the caller"
    elif n >= SHRINK_BELOW * dim:
        chosen, why = "sample", f"{n} images >= {SHRINK_BELOW} x {dim} dimensions"
    elif n < dim:
        chosen, why = "oas", f"{n} images < {dim} dimensions: the sample covariance is singular"
    else:
        held_out = _cross_validated(stats, folds or (), ridge)
        if held_out is None:
            chosen = "oas"
            why = (f"{n} images < {SHRINK_BELOW} x {dim} dimensions, too few to hold some "
                   "out for each class")
        else:
            chosen = max(held_out, key=held_out.get)
            why = (f"{n} images < {SHRINK_BELOW} x {dim} dimensions: of {', '.join(held_out)}, "
                   f"the higher mean log-density of held-out training images over "
                   f"{len(folds)} folds")
            record["held_out_log_density"] = {k: round(v, 4) for k, v in held_out.items()}
    pooled = stats.covariance(0.0, "sample")[1]
    record.update(covariance=chosen, why=why, shrinkage=round(
        oas_shrinkage(pooled, n), 6) if chosen == "oas" else 0.0)
    return record


def held_out_log_density(fitted: TiedGaussianStats, held_out: TiedGaussianStats,
                         ridge: float = 1e-6) -> dict[str, float]:
    """{estimator: the mean log-density of the `held_out` images under the Gaussians fitted
    on `fitted` with it}. Both estimators share the pooled covariance's eigenvectors, so one
    eigendecomposition serves them (a d = 1024 layer's inverse per fold and estimator took
    seconds on 2 cores)."""
    means, pooled = fitted.covariance(0.0, "sample")
    dim, n = len(pooled), held_out.counts.sum()
    eigenvalues, vectors = np.linalg.eigh(pooled)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    # diag(V^T M V) of the held-out scatter M: its spread along each eigenvector
    spread = np.einsum("ij,ij->j", vectors, held_out.scatter(means) @ vectors)
    mean_variance = np.trace(pooled) / dim  # kept by shrinkage
    result = {}
    for kind in ESTIMATORS:
        values = eigenvalues
        if kind == "oas":
            shrinkage = oas_shrinkage(pooled, fitted.counts.sum())
            values = (1.0 - shrinkage) * eigenvalues + shrinkage * mean_variance
        values = values + ridge * max(mean_variance, 1e-12)  # as `TiedGaussianStats.fit`
        result[kind] = float(-0.5 * (dim * np.log(2 * np.pi) + np.log(values).sum()
                                     + (spread / values).sum() / n))
    return result


def _cross_validated(stats, folds, ridge) -> dict[str, float] | None:
    """{estimator: the mean over `folds` of its held-out log-density}; None when a fold
    leaves a class without images to fit."""
    values = []
    for fold in folds:
        rest = stats.minus(fold)
        if (rest.counts < 1).any() or fold.num_images == 0:
            return None
        values.append(held_out_log_density(rest, fold, ridge))
    return {kind: float(np.mean([v[kind] for v in values])) for kind in ESTIMATORS} \
        if values else None


class TiedGaussianScores(keras.layers.Layer):
    """{layer name: features [N, d_l]} -> [N, C] summed standardised class scores.

    For layer l of dimension d_l and squared Mahalanobis distance m_l(x, c) to class c's
    mean, the score is sum_l (d_l - m_l) / sqrt(2 d_l): each term has mean 0 and standard
    deviation 1 over training samples of their own class when the fit is Gaussian. With
    `split`, m_l = b_l + r_l, its parts within the span of the k = C-1 centred whitened class
    means and outside it, and layer l's term is (k - b_l) / sqrt(2k) + (d_l - k - r_l) /
    sqrt(2 (d_l - k)). A call computes each term in the form of `fold`.
    """

    def __init__(self, num_classes: int, dims: dict, split: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes, self.dims, self.split = num_classes, dict(dims), bool(split)
        self.span_dim = num_classes - 1
        if self.split and any(dim <= self.span_dim for dim in self.dims.values()):
            raise ValueError(f"split terms need layers of more than {self.span_dim} "
                             f"dimensions (C-1), got {self.dims}")
        self.means, self.precision_factors = {}, {}
        # Derived from the two above by `set_gaussians` (`fold`): all a call reads.
        self.centers, self.blocks, self.targets, self.constants = {}, {}, {}, {}
        for name, dim in self.dims.items():
            self.means[name] = self.add_weight(
                name=f"{name}_means", shape=(num_classes, dim), trainable=False,
                initializer="zeros")
            self.precision_factors[name] = self.add_weight(
                name=f"{name}_precision_factor", shape=(dim, dim), trainable=False,
                initializer="identity")
            span_dim = min(self.span_dim, dim)
            self.centers[name] = self.add_weight(
                name=f"{name}_center", shape=(dim,), trainable=False, initializer="zeros")
            self.blocks[name] = [self.add_weight(
                name=f"{name}_block{j}", shape=shape, trainable=False, initializer="zeros")
                for j, shape in enumerate(_block_shapes(dim, span_dim))]
            self.targets[name] = self.add_weight(
                name=f"{name}_targets", shape=(num_classes, span_dim), trainable=False,
                initializer="zeros")
            self.constants[name] = _constant(dim, span_dim, self.split)
        self.built = True

    def set_gaussians(self, name: str, means, precision_factor) -> None:
        """Layer `name`'s class means [C, d] and precision Cholesky factor [d, d]."""
        # From the float32 values kept, so that `load_parameters(parameters())` is exact.
        means = np.asarray(means, np.float32)
        factor = np.asarray(precision_factor, np.float32)
        self.means[name].assign(means)
        self.precision_factors[name].assign(factor)
        folded = fold(means, factor, self.split)
        self.centers[name].assign(folded.center.astype(np.float32))
        for weight, block in zip(self.blocks[name], folded.blocks, strict=True):
            weight.assign(block.astype(np.float32))
        self.targets[name].assign(folded.targets.astype(np.float32))

    def call(self, features):
        total = 0.0
        for scores in self.layer_scores(features).values():
            total += scores
        return total

    def summed(self, features):
        """`call`'s [N, C] sum in fewer ops, for serving: one reduction for all the layers'
        span parts and one for all their rests (equal to `call` up to float rounding)."""
        with tf.name_scope(self.name):  # as a call's ops, for profiles
            return _folded_sum(
                [(self._centred(features, name), self.blocks[name], self.targets[name])
                 for name in self.dims], sum(self.constants.values()))

    def layer_scores(self, features) -> dict:
        """{layer name: its [N, C] term of the sum `call` returns}."""
        return {name: _folded_scores(self._centred(features, name), self.blocks[name],
                                     self.targets[name], self.constants[name])
                for name in self.dims}

    def _centred(self, features, name):
        """Layer `name`'s features [N, d] in float32 minus its `Folded.center`."""
        return tf.cast(features[name], tf.float32) - self.centers[name]


# Columns of the triangular factor per product in `fold`: wider blocks read more of its
# zeros, narrower ones cost an op each. 256 served the default layers fastest at batch 1 of
# 128, 256, 512 and 1024 (Xeon with AMX, 2 cores).
BLOCK = 256


class Folded(NamedTuple):
    """One layer's term of `TiedGaussianScores` as constant - ||z_span - targets_c||^2 -
    ||z_rest||^2 for z = (x - center) [G | T] (see `fold`)."""

    center: np.ndarray  # [d], the mean of the class means
    # [d, k + BLOCK]: G and T's first BLOCK columns; then T's later column blocks, each from
    # the row of its first column down (above it T is 0)
    blocks: list[np.ndarray]
    targets: np.ndarray  # [C, k]
    constant: float


def fold(means, precision_factor, split: bool, block: int = BLOCK) -> Folded:
    """A layer's term from its class means [C, d] and precision factor L [d, d] (float64).

    With whitened deviations w = (x - center) L from the mean of the class means and the
    orthonormal basis B [d, k] of `span_basis` (k = min(C-1, d)): the part within the span
    is ||w B - m_c B||^2 = ||(x - center) G - targets_c||^2 with G = L B, and the rest,
    the same for every class, ||w (I - B B^T)||^2 = ||(x - center) T||^2 with T [d, d] the
    lower-triangular factor of L (I - B B^T) (I - B B^T)^T L^T. The whitened class means lie
    within the span, so the joint distance is the sum of the two. Each term's 1 / sqrt(2 dof)
    is folded into G, T and the targets as its square root.

    Against whitening then projecting: one product of the features with [G | T] instead of
    three, no [N, C, d] differences, and T, triangular, read in column blocks from the
    diagonal down: about half the d x d weights. The rest comes from its own coordinates,
    never as a difference of two squared lengths, which float32 would lose.
    """
    means = np.asarray(means, np.float64)
    factor = np.asarray(precision_factor, np.float64)
    dim = means.shape[1]
    center = means.mean(axis=0)
    whitened_means = (means - center) @ factor
    basis = span_basis(whitened_means)  # [d, k]
    span_dim = basis.shape[1]
    span_scale, rest_scale = _scales(dim, span_dim, split)
    span = factor @ basis
    rest = factor - span @ basis.T
    # lower triangular, T T^T = rest rest^T: from rest's QR, not a Cholesky of the singular
    # product
    triangular = np.linalg.qr(rest.T, mode="r").T * np.sqrt(rest_scale)
    span *= np.sqrt(span_scale)
    blocks = [np.concatenate([span, triangular[:, :block]], 1)] + [
        triangular[start:, start:start + block] for start in range(block, dim, block)]
    return Folded(center, blocks, whitened_means @ basis * np.sqrt(span_scale),
                  _constant(dim, span_dim, split))


def _scales(dim: int, span_dim: int, split: bool) -> tuple[float, float]:
    """(1 / sqrt(2 dof) of the span's part, of the rest): their own dof with `split`, else
    the layer's d for both."""
    if not split:
        return (1.0 / np.sqrt(2.0 * dim),) * 2
    return tuple(1.0 / np.sqrt(2.0 * dof) if dof else 0.0
                 for dof in (span_dim, dim - span_dim))


def _constant(dim: int, span_dim: int, split: bool) -> float:
    """The sum of each part's dof / sqrt(2 dof): the term's mean-zero offset."""
    span_scale, rest_scale = _scales(dim, span_dim, split)
    return float(span_dim * span_scale + (dim - span_dim) * rest_scale)


def _block_shapes(dim: int, span_dim: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """The shapes of `Folded.blocks` for a layer of `dim` features."""
    return [(dim, span_dim + min(block, dim))] + [
        (dim - start, min(block, dim - start)) for start in range(block, dim, block)]


def standardized_scores(features, means, precision_factor, split: bool = False) -> tf.Tensor:
    """[N, d] features -> [N, C]: a layer's term of `TiedGaussianScores` from its class means
    and precision factor, in the dtype of the features (float64 where a caller needs it)."""
    features = tf.convert_to_tensor(features)
    folded = fold(means, precision_factor, split)
    center, targets, *blocks = (tf.constant(v, features.dtype)
                                for v in (folded.center, folded.targets, *folded.blocks))
    return _folded_scores(features - center, blocks, targets, folded.constant)


def _folded_scores(centred, blocks, targets, constant) -> tf.Tensor:
    """[N, C] from features [N, d] centred on `Folded.center` (centring first keeps float32
    accurate) and the other parts of a `Folded`."""
    return _folded_sum([(centred, blocks, targets)], constant)


def _folded_sum(parts, constant) -> tf.Tensor:
    """[N, C]: `constant` minus the squared distances of `parts` ([(centred features, blocks,
    targets)] of `Folded`s): the span parts' to their targets and the rests' to zero, each
    summed over all parts in one reduction."""
    spans, rests, targets = [], [], []
    for centred, blocks, part_targets in parts:
        first, *later = _products(centred, blocks)
        span_dim = part_targets.shape[1]
        spans.append(first[:, :span_dim])
        rests += [first[:, span_dim:], *later]
        targets.append(part_targets)
    span = tf.reduce_sum(tf.square(
        tf.concat(spans, 1)[:, None] - tf.concat(targets, 1)[None]), -1)
    rest = tf.reduce_sum(tf.square(tf.concat(rests, 1)), -1, keepdims=True)
    return constant - span - rest


def _products(centred, blocks) -> list:
    """Centred features [N, d] times each of `Folded.blocks`, a later block from the row of
    its first column on."""
    dim = centred.shape[-1]
    first, *later = blocks
    return [tf.matmul(centred, first)] + [
        tf.matmul(centred[:, dim - block.shape[0]:], block) for block in later]


def span_basis(whitened_means: np.ndarray) -> np.ndarray:
    """[d, min(C-1, d)]: orthonormal directions spanning the differences of the whitened
    class means [C, d] (the span of the split terms)."""
    centred = whitened_means - whitened_means.mean(axis=0)
    return np.linalg.svd(centred, full_matrices=False)[2][:len(whitened_means) - 1].T


class FeatureDensity(keras.Model):
    """images -> [N, C] class scores of tied Gaussians fitted on a trained `classifier`'s
    `layers` (see TiedGaussianScores; `split`: two terms per layer). The predicted class is
    the argmax, the rejection score its value: the paper's decision rule applies unchanged."""

    def __init__(self, classifier, num_classes: int,
                 layers: Sequence[str] = DEFAULT_LAYERS, split: bool = DEFAULT_SPLIT, **kwargs):
        super().__init__(**kwargs)
        unknown = sorted(set(layers) - set(LAYERS))
        if unknown or not layers:
            raise ValueError(f"layers must be a non-empty subset of {', '.join(LAYERS)}; "
                             f"got {list(layers)}")
        self.classifier = classifier
        self.num_classes = num_classes
        self.layer_names = tuple(layers)
        dims = _feature_dims(classifier)
        self.split = bool(split)
        self.density_scores = TiedGaussianScores(
            num_classes, {name: dims[name] for name in self.layer_names}, split,
            name="density_scores")
        # per layer, the covariance estimator `fit_features` chose and why
        self.fit_record: dict[str, dict] = {}
        self.built = True

    def call(self, images, training=None):
        return self.density_scores(self.classifier.encoder.features(images, training=False))

    def scores_and_logits(self, images):
        """(class scores [N, C], the classifier's own logits [N, C]) from one encoder pass;
        for SDIM the logits are log p(x|c)."""
        return self.scores_and_logits_from_features(
            self.classifier.encoder.features(images, training=False))

    def scores_and_logits_from_features(self, features: dict):
        """`scores_and_logits` from the encoder's features (`ResNetEncoder.features`)."""
        return self.density_scores(features), self.classifier.logits_from_features(features)

    def fit_features(self, batches: Iterable, ridge: float = 1e-6, progress=None,
                     encode=None, covariance: str = "sample") -> int:
        """Fits every layer from (images, labels) batches (no augmentation); returns N.
        `covariance`: "sample", "oas" or "auto" (`choose_covariance`); what each layer got
        and why is in `fit_record` afterwards. `encode`: an `encode_function()` kept by a
        caller that refits, so that it is traced once (a new one costs seconds)."""
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, got "
                             f"{covariance!r}")
        stats = {name: TiedGaussianStats(self.num_classes, dim)
                 for name, dim in self.density_scores.dims.items()}
        # image i of the stream goes to fold i % FOLDS, while a layer may need them
        folds = {name: [TiedGaussianStats(self.num_classes, dim) for _ in range(FOLDS)]
                 for name, dim in self.density_scores.dims.items()} \
            if covariance == "auto" else {}
        encode = encode or self.encode_function()
        n = 0
        for images, labels in batches:
            labels = np.asarray(labels, np.int64)
            if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                                 f"{labels.min()}..{labels.max()}")
            fold_of = (n + np.arange(len(labels))) % FOLDS
            for name, value in encode(images).items():
                value = value.numpy()
                stats[name].update(value, labels)
                if name in folds and n < SHRINK_BELOW * len(stats[name].outer):
                    for k, fold in enumerate(folds[name]):
                        fold.update(value[fold_of == k], labels[fold_of == k])
            n += len(labels)
            if progress is not None:
                progress(n)
        self.fit_record = {}
        for name, stat in stats.items():
            record = choose_covariance(stat, folds.get(name), ridge, covariance)
            means, factor = stat.fit(ridge, record["covariance"])
            self.density_scores.set_gaussians(name, means, factor)
            self.fit_record[name] = record
        return n

    def encode_function(self):
        """A tf.function: images -> {layer: features} of this scorer's layers."""

        @tf.function
        def encode(images):
            features = self.classifier.encoder.features(images, training=False)  # one pass
            return {name: features[name] for name in self.layer_names}

        return encode

    def parameters(self) -> dict:
        """{"<layer>/means": [C, d], "<layer>/precision_factor": [d, d]} as numpy arrays."""
        scores = self.density_scores
        return {**{f"{k}/means": v.numpy() for k, v in scores.means.items()},
                **{f"{k}/precision_factor": v.numpy()
                   for k, v in scores.precision_factors.items()}}

    def load_parameters(self, parameters: dict) -> None:
        for name in self.layer_names:
            self.density_scores.set_gaussians(name, parameters[f"{name}/means"],
                                              parameters[f"{name}/precision_factor"])


def _feature_dims(classifier) -> dict:
    encoder = classifier.encoder
    dims = {f"stage{s}": f for s, f in enumerate(encoder.filters, start=1)}
    quads = {f"quad{s}": 4 * f for s, f in enumerate(encoder.filters, start=1)}
    return {**dims, **quads, "head": encoder.head_units, "z": encoder.rep_dim}
