"""Training augmentation: pad-and-crop (+ horizontal flip) of He et al. (2016), stateless."""

from __future__ import annotations

import tensorflow as tf

PAD = 4
AUGMENTATIONS = ("none", "crop", "crop_flip")


def augment(images: tf.Tensor, kind: str, seed: tf.Tensor) -> tf.Tensor:
    """Batched pad-4 random crop (+ horizontal flip) with a stateless seed [2]."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; known: {AUGMENTATIONS}")
    if kind == "none":
        return images
    batch = tf.shape(images)[0]
    size = images.shape[1]
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    offsets = tf.random.stateless_uniform([batch, 2], seed, 0, 2 * PAD + 1, tf.int32)
    rows = offsets[:, :1] + tf.range(size)[None]
    cols = offsets[:, 1:] + tf.range(size)[None]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    images = tf.gather(images, cols, axis=2, batch_dims=1)
    if kind == "crop_flip":
        flip = tf.random.stateless_uniform([batch], seed + 1) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, [2]), images)
    return images
