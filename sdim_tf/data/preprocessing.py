"""What the model sees: one function for training, calibration and the exported SavedModel,
so that what the model sees in production is what it saw in training."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

IMAGE_SIZE = 32  # the paper resizes every dataset to 32x32 (appendix B.1)


def preprocess(images: tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """uint8 [N,H,W,C] -> float32 [N,32,32,C] in [0, 1]: bilinear resize, no normalisation."""
    images = tf.convert_to_tensor(images)
    images = tf.cast(images, tf.float32) / 255.0 if images.dtype == tf.uint8 else tf.cast(
        images, tf.float32)
    if images.shape[1] != image_size or images.shape[2] != image_size:
        images = tf.image.resize(images, (image_size, image_size), method="bilinear")
        images = tf.clip_by_value(images, 0.0, 1.0)
    return images


def image_batches(images: np.ndarray, batch_size: int = 500) -> tf.data.Dataset:
    """(preprocessed images, dummy labels) batches of uint8 source or float [0, 1] images."""
    return tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(
        lambda x: (preprocess(x), tf.zeros(tf.shape(x)[:1], tf.int64)))
