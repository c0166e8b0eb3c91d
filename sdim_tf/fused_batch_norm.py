"""Keras' BatchNormalization computed by TensorFlow's fused kernel (FusedBatchNormV3).

Keras 3 on TensorFlow normalizes with `tf.nn.moments` and elementwise ops, every one a pass
over the activations, forward and backward; the fused kernel makes one pass each way. The
layer keeps Keras' semantics, weights and config, so files saved with either load into the
other:

- training: normalize by the batch mean and biased variance, then
  moving = moving * momentum + batch * (1 - momentum), with the biased variance (the kernel
  returns the unbiased one, n / (n - 1) times it: undone here);
- inference, or a non-trainable layer: normalize by the moving statistics;
- bfloat16/float16 inputs: statistics and normalization in float32 inside the kernel, the
  output rounded once to the layer's compute dtype, as Keras' float32 upcast does.

Inputs the kernel does not cover (not 4-D channels-last, float64, masks, renorm, synchronized
statistics) go to Keras' own computation.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# input dtypes FusedBatchNormV3 takes (with float32 scale, offset and statistics)
_KERNEL_DTYPES = (tf.float32, tf.bfloat16, tf.float16)


def unbiased_to_biased(variance: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """The biased batch variance from FusedBatchNormV3's, which it scales by n / max(n - 1, 1)
    over `count` = n values per channel."""
    count = tf.cast(count, variance.dtype)
    return variance * (tf.maximum(count - 1.0, 1.0) / count)


@keras.saving.register_keras_serializable(package="sdim_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` on the fused kernel for 4-D channels-last inputs."""

    def _fusable(self, inputs, mask) -> bool:
        return (mask is None and not self.renorm and not self.synchronized
                and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and tf.as_dtype(inputs.dtype) in _KERNEL_DTYPES)

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.convert_to_tensor(inputs)
        if x.dtype != tf.as_dtype(self.compute_dtype):
            x = tf.cast(x, tf.float32)  # one rounding, to the compute dtype, at the end
        channels = x.shape[-1]
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
        moving_mean = tf.cast(self.moving_mean, tf.float32)
        moving_variance = tf.cast(self.moving_variance, tf.float32)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, epsilon=self.epsilon, data_format="NHWC", is_training=True)
            variance = unbiased_to_biased(variance, tf.size(x) // tf.shape(x)[-1])
            self.moving_mean.assign(
                moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, mean=moving_mean, variance=moving_variance,
                epsilon=self.epsilon, data_format="NHWC", is_training=False)
        return tf.cast(outputs, self.compute_dtype)
