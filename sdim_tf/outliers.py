"""Outliers the SDIM model trains against (its outlier term): 2x2 mosaics of the batch's own
images, locally in-distribution but no class.
"""

from __future__ import annotations

import tensorflow as tf


def batch_mosaics(images: tf.Tensor, count) -> tf.Tensor:
    """In-graph 2x2 mosaics for training, [count, H, W, C]: mosaic i takes its top-left
    quadrant from image i and the top-right, bottom-left and bottom-right ones from images
    i+1, i+2, i+3 of the batch (cyclically) -- the `quadrants` of
    `outlier_proxies.part_outliers` with the batch's neighbours as partners (their classes
    may repeat)."""
    return quadrant_mosaics(*(tf.roll(images, -k, axis=0)[:count] for k in range(4)))


def quadrant_mosaics(a, b, c, d) -> tf.Tensor:
    """2x2 mosaics [N, H, W, C]: top-left of a, top-right of b, bottom-left of c,
    bottom-right of d, split at H // 2 and W // 2."""
    h, w = a.shape[1] // 2, a.shape[2] // 2
    top = tf.concat([a[:, :h, :w], b[:, :h, w:]], axis=2)
    bottom = tf.concat([c[:, h:, :w], d[:, h:, w:]], axis=2)
    return tf.concat([top, bottom], axis=1)
