"""ART's classifier over the model's class scores, batched and compiled.

The attacks see the model's class scores: for SDIM's own score the summed class-conditional
log-likelihoods. Cross-entropy attacks (FGSM, PGD) apply softmax to them (appendix D.1);
DeepFool and CW-L2 use them as they are, so CW's confidence kappa is on the scores' scale.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf


def require_art():
    try:
        import art  # noqa: F401
    except ImportError as e:
        raise ImportError("adversarial attacks need adversarial-robustness-toolbox: "
                          "pip install 'sdim-tf[attacks]'") from e


@functools.cache
def _classifier_class():
    require_art()
    from art.estimators.classification import TensorFlowV2Classifier

    class Classifier(TensorFlowV2Classifier):
        """ART's classifier with batched, compiled predictions and gradients (ART's own are
        eager and predict the whole input at once)."""

        def __init__(self, model, num_classes: int, input_shape, batch_size: int):
            def logits(images, training=False):
                return tf.cast(model(images, training=False), tf.float32)

            super().__init__(model=logits, nb_classes=num_classes,
                             input_shape=tuple(input_shape), clip_values=(0.0, 1.0),
                             loss_object=tf.keras.losses.CategoricalCrossentropy(
                                 from_logits=True))
            self._batch = batch_size
            spec = tf.TensorSpec([None, *input_shape], tf.float32)
            self._logits = tf.function(logits, input_signature=[spec], reduce_retracing=True)

            @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int32)])
            def picked_gradient(images, labels):
                with tf.GradientTape() as tape:
                    tape.watch(images)
                    picked = tf.gather(logits(images), labels, axis=1, batch_dims=1)
                return tape.gradient(picked, images)

            @tf.function(input_signature=[spec])
            def jacobian(images):
                with tf.GradientTape() as tape:
                    tape.watch(images)
                    out = logits(images)
                return tape.batch_jacobian(out, images)  # [N, C, *input_shape], as ART's

            @tf.function(input_signature=[spec, tf.TensorSpec([None, num_classes], tf.float32)])
            def loss_gradient(images, onehot):
                with tf.GradientTape() as tape:
                    tape.watch(images)
                    loss = tf.nn.softmax_cross_entropy_with_logits(onehot, logits(images))
                return tape.gradient(loss, images)

            self._picked_gradient, self._jacobian = picked_gradient, jacobian
            self._loss_gradient = loss_gradient

        def _batched(self, fn, *arrays):
            n = len(arrays[0])
            if n == 0:
                return fn(*(a[:0] for a in arrays)).numpy()
            return np.concatenate([fn(*(a[i:i + self._batch] for a in arrays)).numpy()
                                   for i in range(0, n, self._batch)])

        def predict(self, x, batch_size=None, training_mode=False, **kwargs):
            return self._batched(self._logits, np.asarray(x, np.float32))

        def class_gradient(self, x, label=None, training_mode=False, **kwargs):
            x = np.asarray(x, np.float32)
            if label is None:
                return self._batched(self._jacobian, x)
            labels = np.broadcast_to(np.asarray(label, np.int32), (len(x),))
            return self._batched(self._picked_gradient, x, labels)[:, None]

        def loss_gradient(self, x, y, training_mode=False, **kwargs):
            onehot = np.asarray(y, np.float32)
            if onehot.ndim == 1:
                onehot = np.eye(self.nb_classes, dtype=np.float32)[onehot.astype(int)]
            if isinstance(x, tf.Tensor):  # ART's TF PGD calls this inside its own loop
                return self._loss_gradient(tf.cast(x, tf.float32), tf.convert_to_tensor(onehot))
            return self._batched(self._loss_gradient, np.asarray(x, np.float32), onehot)

    return Classifier


def art_classifier(model, num_classes: int, input_shape, batch_size: int = 100):
    """An ART `TensorFlowV2Classifier` over `model(images) -> logits [N, C]`, inputs in [0, 1]."""
    return _classifier_class()(model, num_classes, input_shape, batch_size)
