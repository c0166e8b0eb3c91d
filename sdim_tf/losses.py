"""Supervised losses of SDIM on the per-dimension log-likelihood (paper equations 5 and 6).

Both take `per_dim_ll = log p(z|c) / d`, [N, C], as the authors' code does. The margin
K = 10 is per dimension: on the summed scale it is 10 d = 640 for d = 64, which is what
produces the gaps of several hundred between true and false classes in the paper's Table 4.
"""

from __future__ import annotations

import tensorflow as tf


def true_class(per_dim_ll: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """[N, C], [N] -> [N]: each sample's log-likelihood of its own class, in float32."""
    return tf.gather(tf.cast(per_dim_ll, tf.float32), tf.cast(labels, tf.int32), axis=1,
                     batch_dims=1)


def nll_loss(per_dim_ll: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """J_NLL (equation 5): minus the mean log-likelihood of each sample's true class."""
    return -tf.reduce_mean(true_class(per_dim_ll, labels))


def likelihood_margin_loss(per_dim_ll: tf.Tensor, labels: tf.Tensor,
                           margin: float = 10.0) -> tf.Tensor:
    """J_LM (equation 6): squared hinge max(ll_c + K - ll_y, 0)^2 over the C-1 false classes.

    Averaged over each sample's own false classes, then over the batch.
    """
    per_dim_ll = tf.cast(per_dim_ll, tf.float32)
    labels = tf.cast(labels, tf.int32)
    num_classes = tf.shape(per_dim_ll)[1]
    true_ll = true_class(per_dim_ll, labels)
    gaps = tf.nn.relu(per_dim_ll + margin - true_ll[:, None]) ** 2
    false = 1.0 - tf.one_hot(labels, num_classes, dtype=tf.float32)
    per_sample = tf.reduce_sum(gaps * false, axis=1) / tf.cast(num_classes - 1, tf.float32)
    return tf.reduce_mean(per_sample)


def outlier_margin_loss(outlier_per_dim_ll: tf.Tensor, reference_per_dim_ll: tf.Tensor,
                        margin: float = 10.0) -> tf.Tensor:
    """Squared hinge max(max_c ll_c(outlier) + K - ll_ref, 0)^2, averaged over the outliers:
    each synthesised outlier's best class at least K (per dimension) below `reference`, the
    true-class log-likelihood of the training image it was made from (held fixed, so the
    term moves only the outliers). Not in the paper: an option for rejection that holds
    (`SDIM(outlier_weight=...)`).
    """
    top = tf.reduce_max(tf.cast(outlier_per_dim_ll, tf.float32), axis=1)
    reference = tf.stop_gradient(tf.cast(reference_per_dim_ll, tf.float32))
    return tf.reduce_mean(tf.nn.relu(top + margin - reference) ** 2)
