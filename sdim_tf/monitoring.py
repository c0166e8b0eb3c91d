"""How well a trained model's rejection works, measured on held-out data only.

Rejection decays with training (docs/results.md: 98.4% of MNIST rejected by a Fashion-MNIST
model at 8 epochs, 82% at 50) while accuracy keeps rising, so it has to be watched like a
loss. `rejection_quality` measures, for the model's own log p(x|c) and for tied Gaussians
(`sdim_tf.density.FeatureDensity`) on sets of encoder layers, the deployed rule
(a rule of `sdim_tf.rules`, as the calibrate stage deploys it): one threshold shared by all
classes, by default split conformal on the held-out images' top scores, else ("percentile")
the largest percentile of the correct ones rejecting at most `budget` of the held-out images;
then the share of each outlier set it rejects and the AUROC held-out vs outliers.
The outliers must be built from training or held-out images (`sdim_tf.outlier_proxies`); test sets
may only come in as the final measure (`test`, `test_outliers`), never for selection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from sdim_tf import density, metrics, rejection, rules

MODEL_SCORE = "model"


def layer_set(layers: Sequence[str] = density.DEFAULT_LAYERS,
              split: bool = density.DEFAULT_SPLIT) -> tuple[str, ...]:
    """The monitor's layer set of a FeatureDensity(layers, split=split)."""
    return (*layers, *[density.SPLIT] * bool(split))


def score_name(layers: Sequence[str]) -> str:
    """"density_<layer>_<layer>..." (layer names hold no "_"; "+" is no valid summary tag);
    a set scored with split terms ends with density.SPLIT: "density_head_split"."""
    return "density_" + "_".join(layers)


def rejection_quality(model, fit: tuple[np.ndarray, np.ndarray],
                      held_out: tuple[np.ndarray, np.ndarray], outliers: Mapping[str, np.ndarray],
                      budget: float = 0.04,
                      layers: Sequence[Sequence[str]] = (layer_set(),),
                      batch_size: int = 500, test: tuple[np.ndarray, np.ndarray] | None = None,
                      test_outliers: Mapping[str, np.ndarray] | None = None,
                      rule: str = "conformal", confidence: float | None = 0.95) -> dict:
    """Accuracy, deployed-rule rejection and outlier AUROC of every score, on held-out data.

    Args:
      model: a trained `SDIM` or `DiscriminativeClassifier`.
      fit: (images, labels) the tied Gaussians are fitted on (trained images, no augmentation).
      held_out: (images, labels) never trained on: accuracy, percentile and thresholds.
      outliers: {name: images} built from training or held-out images.
      budget: the share of new held-out-like images the threshold may reject (alpha).
      layers: one FeatureDensity per layer set; a set ending with `density.SPLIT` is scored
        with split terms. The model's own output is always scored too.
      batch_size: images per forward pass.
      test, test_outliers: the final measure only (test images and labels, real OOD sets):
        reported under "final_measure", kept out of every mean; never select on them.
      rule: "conformal", the threshold `conformal.threshold(top held-out scores, budget,
        confidence)` (confidence None: on average); or "percentile", the largest percentile
        (steps of 0.05) of the correct held-out images' scores rejecting at most `budget`.

    Returns:
      {"model": q, score_name(layers[0]): q, ..., "seconds": s} where q holds `accuracy`,
      `percentile` (rule "percentile" only), `threshold` (shared by all classes), `rejected`
      (held-out share),
      `outlier_rejected` and `outlier_auroc` ({name: x}), `mean_outlier_rejected`,
      `mean_outlier_auroc` and, with test data, `final_measure`. Images are float32
      [N, H, W, C] in [0, 1].
    """
    return RejectionMonitor(model, fit, held_out, outliers, budget, layers, batch_size,
                            rule, confidence)(test, test_outliers)


class RejectionMonitor:
    """`rejection_quality` of one model on fixed images, measured again after each epoch.

    Its functions are traced once: a new tf.function costs seconds per call (tracing and
    graph optimisation of the encoder), which each epoch would pay again.
    """

    def __init__(self, model, fit, held_out, outliers: Mapping[str, np.ndarray],
                 budget: float = 0.04,
                 layers: Sequence[Sequence[str]] = (layer_set(),),
                 batch_size: int = 500, rule: str = "conformal",
                 confidence: float | None = 0.95):
        # the unfamiliar rule with the budget as its setting, one threshold for all classes
        settings = {"alpha": budget, "budget": budget, "confidence": confidence,
                    "grouping": "shared"}
        if rule not in rules.names(rejection.UNFAMILIAR):
            raise ValueError(f"rule must be one of {', '.join(rules.names(rejection.UNFAMILIAR))}"
                             f", got {rule!r}")
        self.rule = rules.build(rule, settings)
        self.fit, self.held_out, self.outliers = fit, held_out, dict(outliers)
        self.budget, self.batch_size = budget, batch_size
        self.layer_sets = [tuple(s) for s in layers]
        needed = [name for name in density.LAYERS if any(name in s for s in self.layer_sets)]
        num_classes = int(model.config["num_classes"])
        self._scorer = density.FeatureDensity(model, num_classes, needed, split=False) \
            if needed else None
        self._encode = self._scorer.encode_function() if needed else None
        # A set's score is the sum of its layers' terms: one fit serves every set, the split
        # terms' too (copied after each fit).
        self._split = density.TiedGaussianScores(
            num_classes, self._scorer.density_scores.dims, split=True) if any(
                s[-1:] == (density.SPLIT,) for s in self.layer_sets) else None
        self._forward = _forward(model, self._scorer.density_scores if needed else None,
                                 tuple(held_out[0].shape[1:]), self._split)

    def __call__(self, test: tuple[np.ndarray, np.ndarray] | None = None,
                 test_outliers: Mapping[str, np.ndarray] | None = None) -> dict:
        """The quality of the model's current weights (see `rejection_quality`)."""
        started = time.perf_counter()
        if self._scorer is not None:
            self._refit()
        image_sets = {"held_out": self.held_out[0],
                      **{f"outlier/{k}": v for k, v in self.outliers.items()}}
        if test is not None:
            image_sets["test"] = test[0]
        for name, images in (test_outliers or {}).items():
            image_sets[f"test_outlier/{name}"] = images
        # set name -> {"model" or layer: [N, C] float64}: one encoder pass per image set.
        outputs = {name: batched(self._forward, images, self.batch_size)
                   for name, images in image_sets.items()}
        scores = {MODEL_SCORE: {k: v[MODEL_SCORE] for k, v in outputs.items()}}
        for layer_set in self.layer_sets:
            split = layer_set[-1:] == (density.SPLIT,)
            keys = [f"{layer}/{density.SPLIT}" if split else layer
                    for layer in layer_set[:len(layer_set) - split]]
            scores[score_name(layer_set)] = {k: sum(v[key] for key in keys)
                                             for k, v in outputs.items()}
        result = {name: _quality(by_set, self.held_out[1], list(self.outliers),
                                 self._threshold(by_set["held_out"]),
                                 None if test is None else test[1], list(test_outliers or {}))
                  for name, by_set in scores.items()}
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result

    def _threshold(self, class_scores: np.ndarray) -> tuple[float | None, float]:
        """(percentile or None, the shared threshold) on the held-out scores; -inf (none
        rejected) when the held-out images are too few for the rule's promise."""
        try:
            chosen = self.rule.calibrate(class_scores, self.held_out[1])
        except rules.CalibrationError:
            return None, -math.inf
        return chosen.record.get("percentile"), float(chosen.thresholds[0])

    def _refit(self) -> None:
        images, labels = self.fit
        size = self.batch_size
        batches = ((images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size))
        self._scorer.fit_features(batches, encode=self._encode)
        if self._split is not None:
            for name, means in self._scorer.density_scores.means.items():
                self._split.set_gaussians(name, means.numpy(), self._scorer.density_scores
                                          .precision_factors[name].numpy())


def flat(quality: dict, prefix: str = "") -> dict[str, float]:
    """{"model/accuracy": x, "density_head/outlier_auroc/flipped": y, ...}: the scalars of a
    `rejection_quality` result under "/"-joined keys, for CSV rows and TensorBoard."""
    rows = {}
    for key, value in quality.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.update(flat(value, f"{name}/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                value, bool):
            rows[name] = float(value)
    return rows


def _forward(model, density_scores, image_shape: tuple, split_scores=None):
    """A tf.function: images -> {"model": the model's own output [N, C], layer: [N, C] (each
    layer's term of `density_scores`, a `density.TiedGaussianScores` or None), and
    "<layer>/split": the split terms of `split_scores` if given}.

    The model's output comes from the same encoder pass, through its own head.
    """

    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)])
    def forward(images):
        features = model.encoder.features(images, training=False)
        out = {MODEL_SCORE: tf.cast(model.logits_from_features(features), tf.float32)}
        if density_scores is not None:
            out.update(density_scores.layer_scores(features))
        if split_scores is not None:
            out.update({f"{k}/{density.SPLIT}": v
                        for k, v in split_scores.layer_scores(features).items()})
        return out

    return forward


def batched(forward, images: np.ndarray, batch_size: int) -> dict:
    """{name: float64 [N, ...]}: `forward` (images -> {name: tensor}) over `images` in batches,
    concatenated; an empty input runs one empty batch."""
    parts = [forward(tf.constant(images[i:i + batch_size], tf.float32))
             for i in range(0, len(images), batch_size)]
    if not parts:
        parts = [forward(tf.zeros((0, *images.shape[1:]), tf.float32))]
    return {k: np.concatenate([p[k].numpy() for p in parts]).astype(np.float64)
            for k in parts[0]}


def _quality(scores: dict, labels: np.ndarray, outliers: list,
             threshold: tuple[float | None, float], test_labels: np.ndarray | None,
             test_outliers: list) -> dict:
    """The shared threshold (percentile or None, value) on one score's [N, C] outputs of every
    image set."""
    labels = np.asarray(labels).reshape(-1)
    class_scores = scores["held_out"]
    percentile, value = threshold
    thresholds = np.full(class_scores.shape[1], value)
    top = {k: v.max(axis=1) for k, v in scores.items()}
    rejected = {k: _rejected(v, thresholds) for k, v in scores.items()}
    result = {"accuracy": _accuracy(class_scores, labels),
              **({} if percentile is None else {"percentile": float(percentile)}),
              "threshold": float(value),
              "rejected": _share(rejected["held_out"]),
              "outlier_rejected": {k: _share(rejected[f"outlier/{k}"]) for k in outliers},
              "outlier_auroc": {k: metrics.auroc(top["held_out"], top[f"outlier/{k}"])
                                for k in outliers}}
    result["mean_outlier_auroc"] = _mean(result["outlier_auroc"].values())
    result["mean_outlier_rejected"] = _mean(result["outlier_rejected"].values())
    if test_labels is not None or test_outliers:
        final = {}
        if test_labels is not None:
            final["accuracy"] = _accuracy(scores["test"], np.asarray(test_labels).reshape(-1))
            final["rejected"] = _share(rejected["test"])
        reference = "test" if test_labels is not None else "held_out"
        final["outlier_rejected"] = {k: _share(rejected[f"test_outlier/{k}"])
                                     for k in test_outliers}
        final["outlier_auroc"] = {k: metrics.auroc(top[reference], top[f"test_outlier/{k}"])
                                  for k in test_outliers}
        result["final_measure"] = final
    return result


def _rejected(class_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The deployed rule (equation 9, `rejection.decide`)."""
    if not len(class_scores):
        return np.zeros(0, bool)
    return rejection.decide(class_scores, thresholds).rejected.numpy()


def _accuracy(class_scores: np.ndarray, labels: np.ndarray) -> float:
    return float((class_scores.argmax(axis=1) == labels).mean()) if len(labels) else math.nan


def _share(flags: np.ndarray) -> float:
    return float(flags.mean()) if len(flags) else math.nan


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan
