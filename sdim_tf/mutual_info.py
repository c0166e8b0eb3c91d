"""Local mutual information: critics T(local map, z) and lower bounds (JSD, DV, infoNCE).

Critics return `(positive, negative)` scores: positive [N, P] for every image i and local
position p (z_i with its own map), negative [N, K, P] pairing z_i with K other images' maps.
Bounds turn them into J_MI (a loss: lower is more mutual information).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import layers

LOG2 = math.log(2.0)
BOUNDS = ("jsd", "dv", "infonce")


def jsd_loss(positive: tf.Tensor, negative: tf.Tensor) -> tf.Tensor:
    """Jensen-Shannon bound: mean E_neg - mean E_pos (Hjelm et al., 2018)."""
    positive, negative = tf.cast(positive, tf.float32), tf.cast(negative, tf.float32)
    e_pos = LOG2 - tf.nn.softplus(-positive)
    e_neg = tf.nn.softplus(-negative) + negative - LOG2
    return tf.reduce_mean(e_neg) - tf.reduce_mean(e_pos)


def dv_loss(positive: tf.Tensor, negative: tf.Tensor) -> tf.Tensor:
    """Donsker-Varadhan bound (MINE, equation 1): -(E_J[T] - log E_M[exp T])."""
    positive, negative = tf.cast(positive, tf.float32), tf.cast(negative, tf.float32)
    flat = tf.reshape(negative, [-1])
    log_mean_exp = tf.reduce_logsumexp(flat) - tf.math.log(tf.cast(tf.size(flat), tf.float32))
    return log_mean_exp - tf.reduce_mean(positive)


def infonce_loss(positive: tf.Tensor, negative: tf.Tensor) -> tf.Tensor:
    """infoNCE (Oord et al., 2018): per (image, position), the positive against its negatives."""
    positive, negative = tf.cast(positive, tf.float32), tf.cast(negative, tf.float32)
    logits = tf.concat([positive[:, None], negative], axis=1)  # [N, 1 + K, P]
    return -tf.reduce_mean(positive - tf.reduce_logsumexp(logits, axis=1))


def mi_loss(positive: tf.Tensor, negative: tf.Tensor, bound: str = "jsd") -> tf.Tensor:
    """J_MI for `bound` in BOUNDS."""
    try:
        fn = {"jsd": jsd_loss, "dv": dv_loss, "infonce": infonce_loss}[bound]
    except KeyError:
        raise ValueError(f"unknown MI bound {bound!r}; known: {', '.join(BOUNDS)}") from None
    return fn(positive, negative)


def derangement(n: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
    """A random permutation of range(n) with no fixed point (n >= 2).

    Shuffle, then map each element to its successor in the shuffled order: a random cycle.
    """
    order = tf.random.shuffle(tf.range(n)) if seed is None else tf.argsort(
        tf.random.stateless_uniform([n], seed))
    successor = tf.roll(order, shift=-1, axis=0)
    return tf.scatter_nd(order[:, None], successor, [n])


@keras.saving.register_keras_serializable(package="sdim_tf")
class ConcatCritic(layers.Layer):
    """The paper's critic (appendix B.2, Table 8): concat z tiled over the map, 1x1 convs.

    1x1 conv 256 ReLU -> 1x1 conv 256 ReLU -> 1x1 conv 1. Negatives pair z_i with the map
    of image pi(i) for a random derangement pi of the batch (K = 1).
    """

    def __init__(self, units: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.net = [layers.Conv2D(units, 1, activation="relu", name="conv1"),
                    layers.Conv2D(units, 1, activation="relu", name="conv2"),
                    layers.Conv2D(1, 1, name="conv3")]

    def build(self, local_shape, z_shape):
        shape = (*local_shape[:3], local_shape[3] + z_shape[-1])
        for conv in self.net:
            conv.build(shape)
            shape = conv.compute_output_shape(shape)

    def _score(self, local, z):
        tiled = tf.broadcast_to(z[:, None, None, :],
                                tf.concat([tf.shape(local)[:3], tf.shape(z)[-1:]], 0))
        h = tf.concat([local, tf.cast(tiled, local.dtype)], axis=-1)
        for conv in self.net:
            h = conv(h)
        return tf.reshape(h, [tf.shape(h)[0], -1])  # [N, P]

    def call(self, local, z):
        n = tf.shape(z)[0]
        both = self._score(tf.concat([local, tf.gather(local, derangement(n))], 0),
                           tf.concat([z, z], 0))
        positive, negative = both[:n], both[n:]
        return positive, negative[:, None, :]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="sdim_tf")
class Embed1x1(layers.Layer):
    """DIM's 1x1-conv embedding: conv-BN-ReLU-conv plus a linear shortcut, then layer norm."""

    def __init__(self, units: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.conv1 = layers.Conv2D(units, 1, use_bias=False, name="conv1")
        self.bn = layers.BatchNormalization(name="bn", momentum=0.9, epsilon=1e-5)
        self.conv2 = layers.Conv2D(units, 1, name="conv2")
        self.shortcut = layers.Conv2D(units, 1, use_bias=False, name="shortcut")
        self.norm = layers.LayerNormalization(name="norm", epsilon=1e-5)

    def build(self, input_shape):
        out = (*input_shape[:3], self.units)
        self.conv1.build(input_shape)
        self.bn.build(out)
        self.conv2.build(out)
        self.shortcut.build(input_shape)
        self.norm.build(out)

    def call(self, x, training=None):
        h = self.conv2(tf.nn.relu(self.bn(self.conv1(x), training=training)))
        return self.norm(h + self.shortcut(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="sdim_tf")
class DotCritic(layers.Layer):
    """The authors' code's critic: embed map and z into `units`, score by dot products.

    Every z_i is scored against every local position of every image j in the batch:
    positives are i == j, negatives the other N - 1 images (K = N - 1).
    """

    def __init__(self, units: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.local_net = Embed1x1(units, name="local_net")
        self.global_net = Embed1x1(units, name="global_net")

    def build(self, local_shape, z_shape):
        self.local_net.build(local_shape)
        self.global_net.build((z_shape[0], 1, 1, z_shape[-1]))

    def call(self, local, z, training=None):
        n = tf.shape(z)[0]
        loc = self.local_net(local, training=training)
        loc = tf.reshape(loc, [n, -1, self.units])  # [N, P, U]
        glob = tf.reshape(self.global_net(z[:, None, None, :], training=training),
                          [n, self.units])
        scores = tf.einsum("iu,jpu->ijp", glob, tf.cast(loc, glob.dtype))  # [N, N, P]
        positive = tf.einsum("iu,ipu->ip", glob, tf.cast(loc, glob.dtype))
        off_diagonal = tf.logical_not(tf.eye(n, dtype=tf.bool))
        negative = tf.reshape(tf.boolean_mask(scores, off_diagonal),
                              [n, n - 1, tf.shape(scores)[2]])
        return positive, negative

    def get_config(self):
        return {**super().get_config(), "units": self.units}


CRITICS = {"concat": ConcatCritic, "dot": DotCritic}
# The local map each critic reads by default: the paper's 4x4 (stage 4), the code's 16x16.
DEFAULT_LOCAL_STAGE = {"concat": 4, "dot": 2}
