"""Class conditionals: one isotropic Gaussian per class on the representation z."""

from __future__ import annotations

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from keras import layers

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="sdim_tf")
class ClassConditionalGaussians(layers.Layer):
    """log p(z | y=c) for every class c under N(mu_c, diag(exp(log_scale_c))^2).

    The parameters are one C x 2d table (mean, log-scale), initialised N(0, 1) like the
    authors' `nn.Embedding`. `log_scale_floor` (off by default; the authors' later code uses
    log 0.02) keeps a class from collapsing onto a point. Always computed in float32.
    """

    def __init__(self, num_classes: int, rep_dim: int, log_scale_floor: float | None = None,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes, self.rep_dim = num_classes, rep_dim
        self.log_scale_floor = log_scale_floor

    def build(self, input_shape=None):
        self.embedding = self.add_weight(
            name="embedding", shape=(self.num_classes, 2 * self.rep_dim),
            initializer=keras.initializers.RandomNormal(0.0, 1.0))

    @property
    def means(self) -> tf.Tensor:
        return self.embedding[:, : self.rep_dim]

    @property
    def log_scales(self) -> tf.Tensor:
        log_scales = self.embedding[:, self.rep_dim:]
        if self.log_scale_floor is not None:
            log_scales = tf.maximum(log_scales, self.log_scale_floor)
        return log_scales

    def distribution(self) -> tfd.MultivariateNormalDiag:
        """The C class conditionals as one batched distribution (batch shape [C])."""
        return tfd.MultivariateNormalDiag(loc=self.means, scale_diag=tf.exp(self.log_scales))

    def call(self, z):
        z = tf.cast(z, tf.float32)
        return self.distribution().log_prob(z[:, None, :])  # [N, C]

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "rep_dim": self.rep_dim, "log_scale_floor": self.log_scale_floor}
