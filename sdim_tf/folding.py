"""The encoder's inference-mode batch norms folded into the layers before them, for serving.

A batch norm with moving mean m, moving variance v, scale gamma, offset beta and epsilon eps
maps a convolution's (or dense layer's) output y = x * W + b to (y - m) s + beta with
s = gamma / sqrt(v + eps) per channel: the same as x * (W s) + ((b - m) s + beta), one layer
with a bias. In a SavedModel the statistics are variables, which Grappler does not fold into
constants: unfolded, each norm costs several elementwise ops per call, and at batch 1 the ops'
overhead is much of a call's time (bench/serving_speed.py).

Only for inference: the trained model and its checkpoints are unchanged, and `fold_encoder`
builds a separate encoder in float32 (what exports compute in) from their weights.

`FoldedScorer` also reads the folded weights as constants (an export holds them in its graph):
oneDNN then keeps each convolution's kernel in its blocked layout between calls, where a
variable's kernel is read in the plain layout on every call (bench/serving_speed.py).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from sdim_tf import encoder as encoder_lib
from sdim_tf import precision


class Shift(keras.layers.Layer):
    """x + bias over the last axis: what a batch norm folded into the layer before it leaves
    (a bias add, which Grappler fuses into the convolution before it). Built in place of the
    encoder's batch norms (`encoder.batch_norm_class`), whose other arguments it ignores."""

    def __init__(self, name: str | None = None, **batch_norm_arguments):
        del batch_norm_arguments
        super().__init__(name=name)

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=(input_shape[-1],),
                                    initializer="zeros", trainable=False)

    def call(self, x, training=None):
        del training
        return tf.nn.bias_add(x, self.bias)


def quadrant_sums_pool(x):
    """`encoder.quadrant_pool` as two sums over contiguous axes (rows, then columns of each
    quadrant): the same values up to float rounding, and at batch 1 a fraction of the
    average pool's time (oneDNN CPUs, bench/serving_speed.py)."""
    _, height, width, channels = x.shape
    with tf.name_scope("quadrant_pool"):
        rows = tf.reduce_sum(tf.reshape(x, (-1, 2, height // 2, width, channels)), 2)
        sums = tf.reduce_sum(tf.reshape(rows, (-1, 2, 2, width // 2, channels)), 3)
        return tf.reshape(sums * (4.0 / (height * width)), (-1, 4 * channels))


class FoldedEncoder(encoder_lib.ResNetEncoder):
    """The encoder `fold_encoder` builds: quadrant features by `quadrant_sums_pool`."""

    def _quadrant_pool(self, x):
        return quadrant_sums_pool(x)


def fold_batch_norm(kernel, bias, norm: keras.layers.BatchNormalization
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(kernel W s, bias (b - m) s + beta) in float64 of a layer with `kernel` (output
    channels last) and `bias` (None: none) whose output `norm` normalizes with its moving
    statistics."""
    moving_mean = np.asarray(norm.moving_mean, np.float64)
    variance = np.asarray(norm.moving_variance, np.float64)
    scale = (np.asarray(norm.gamma, np.float64) if norm.scale else 1.0) / np.sqrt(
        variance + norm.epsilon)
    offset = np.asarray(norm.beta, np.float64) if norm.center else 0.0
    bias = 0.0 if bias is None else np.asarray(bias, np.float64)
    return np.asarray(kernel, np.float64) * scale, (bias - moving_mean) * scale + offset


def fold_encoder(encoder: encoder_lib.ResNetEncoder) -> FoldedEncoder:
    """A float32 copy of `encoder` whose batch norms are folded into the layers before them
    (`Shift` in their place): its `features` equal the original's inference-mode ones up to
    float rounding. For inference only: it has no batch norms to train."""
    config = {k: v for k, v in encoder.get_config().items() if k != "dtype"}
    with precision.policy("float32"), encoder_lib.batch_norm_class(Shift):
        folded = FoldedEncoder.from_config(config)
    folded.build((None, None, None, encoder.stem.kernel.shape[2]))
    assigned = []
    for (layer, norm), (copy, shift) in zip(encoder.normalized_layers(),
                                            folded.normalized_layers(), strict=True):
        kernel, bias = fold_batch_norm(layer.kernel, getattr(layer, "bias", None), norm)
        copy.kernel.assign(kernel.astype(np.float32))
        shift.bias.assign(bias.astype(np.float32))
        assigned += [copy.kernel, shift.bias]
        if getattr(copy, "bias", None) is not None:  # all of it is in the shift's
            copy.bias.assign(np.zeros(copy.bias.shape, np.float32))
            assigned.append(copy.bias)
    folded.out.set_weights([np.asarray(w) for w in encoder.out.weights])
    assigned += folded.out.weights
    missed = {id(w) for w in folded.weights} - {id(w) for w in assigned}
    if missed:  # an encoder layer `normalized_layers` does not know
        raise ValueError(f"fold_encoder: {len(missed)} of the folded encoder's weights were "
                         "not set from the original's")
    return folded


class FoldedScorer(tf.Module):
    """`scorer` (a `sdim_tf.scores` scorer: a classifier or its fitted density) computing on
    its encoder with the batch norms folded (`fold_encoder`), whose weights it reads as
    constants: `scores_and_logits` as `serving.RejectingClassifier` calls it, and the class
    scores when called. A density's scores come from `TiedGaussianScores.summed`."""

    def __init__(self, scorer, name: str = "folded_scorer"):
        super().__init__(name=name)
        self.scorer = scorer
        self.encoder = fold_encoder(getattr(scorer, "classifier", scorer).encoder)
        self._values = [np.asarray(w) for w in self.encoder.weights]  # read once, eagerly

    def scores_and_logits(self, images):
        constants = [(w, tf.constant(v)) for w, v in
                     zip(self.encoder.weights, self._values, strict=True)]
        with keras.StatelessScope(constants):
            features = self.encoder.features(images, training=False)
        density = getattr(self.scorer, "density_scores", None)
        if density is None:
            return self.scorer.scores_and_logits_from_features(features)
        return (density.summed(features),
                self.scorer.classifier.logits_from_features(features))

    def __call__(self, images, training=None):
        del training
        return self.scores_and_logits(images)[0]
