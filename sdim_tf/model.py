"""SDIM (encoder + local-MI critic + class-conditional Gaussians) and its discriminative twin."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from sdim_tf import losses, mutual_info, outliers
from sdim_tf import robust as _robust
from sdim_tf.class_conditional import ClassConditionalGaussians
from sdim_tf.encoder import ResNetEncoder


class _Classifier(keras.Model):
    """Shared custom train/test steps: `_loss_terms` gives the total, named terms and logits.

    Under tf.distribute each replica's mean loss is divided by the number of replicas, so
    the summed gradients are those of the global batch mean.
    """

    loss_names: tuple[str, ...] = ("loss",)
    robust: _robust.RobustTraining = _robust.RobustTraining()  # adversarial training: off

    def _make_trackers(self):
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_names}
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def _local_shape(self, input_shape):
        size = input_shape[1] // 2 ** (self.encoder.local_stage - 1)
        return (None, size, size, self.encoder.filters[self.encoder.local_stage - 1])

    @property
    def metrics(self):
        return [*self.trackers.values(), self.accuracy]

    def compile(self, optimizer=None, jit_compile=False, **kwargs):
        """Adam 1e-3 (the paper's) unless given; XLA off (slower than tf.function on CPU)."""
        if optimizer is None:
            optimizer = keras.optimizers.Adam(1e-3)
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        """Restores the optimizer (and its state, loaded next) of a saved model."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(optimizer=config.get("optimizer"),
                     jit_compile=config.get("jit_compile", False))
        self.optimizer.build(self.trainable_variables)

    def _report(self, terms, labels, logits):
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        self.accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        images, labels = data[:2]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        images, extra = _robust.training_inputs(self.robust, self, images, labels)
        with tf.GradientTape() as tape:
            terms, logits = self._loss_terms(images, labels, training=True, **extra)
            scaled = terms["loss"] / replicas
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return self._report(terms, labels, logits)

    def test_step(self, data):
        images, labels = data[:2]
        terms, logits = self._loss_terms(images, labels, training=False)
        return self._report(terms, labels, logits)

    def get_config(self):
        """The constructor arguments (self.config), so that .keras files round-trip."""
        base = super().get_config()
        return {**base, **{k: list(v) if isinstance(v, tuple) else v
                           for k, v in self.config.items()}}

    def scores_and_logits(self, images):
        """(class scores, logits) [N, C]: a classifier scores with its own logits."""
        logits = self(images, training=False)
        return logits, logits

    def scores_and_logits_from_features(self, features: dict):
        """`scores_and_logits` from the encoder's features (`ResNetEncoder.features`)."""
        logits = self.logits_from_features(features)
        return logits, logits

    def trainable_parameter_count(self) -> int:
        """Trainable parameters (batch-norm moving statistics left out, as in the paper)."""
        return int(sum(int(tf.size(v)) for v in self.trainable_weights))


@keras.saving.register_keras_serializable(package="sdim_tf")
class SDIM(_Classifier):
    """Supervised Deep InfoMax. `call(x)` returns the summed log p(z|c), [N, C] (the logits).

    Training minimises alpha * J_MI + beta * J_NLL + gamma * J_LM (paper equation 7), the
    supervised terms on the per-dimension log-likelihood log p(z|c) / d. With
    `outlier_weight` > 0 (not in the paper; off by default) it adds that weight times
    `losses.outlier_margin_loss` on 2x2 mosaics of a quarter of each batch
    (`outliers.batch_mosaics`), encoded in the same pass as the batch (its batch-norm
    statistics include them). With `robust` (`sdim_tf.robust.RobustTraining` or its config;
    off by default) each training step adds terms on adversarial examples of the batch,
    encoded in the same pass, or trains on them in place of the batch (`beside_clean` False).
    """

    loss_names = ("loss", "mi_loss", "nll_loss", "lm_loss")

    def __init__(self, num_classes: int, input_shape: Sequence[int] = (32, 32, 1), n: int = 1,
                 rep_dim: int = 64, critic: str = "concat", alpha: float = 1.0,
                 beta: float = 1.0, gamma: float = 1.0, margin: float = 10.0,
                 mi_bound: str = "jsd", critic_units: int = 256,
                 local_stage: int | None = None, log_scale_floor: float | None = None,
                 filters: Sequence[int] = (32, 64, 128, 256), outlier_weight: float = 0.0,
                 outlier_margin: float = 10.0, robust: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if outlier_weight < 0:
            raise ValueError(f"outlier_weight must be >= 0, got {outlier_weight}")
        self.robust = _robust.RobustTraining.from_config(robust)
        self.loss_names = (*SDIM.loss_names, *("om_loss",) * bool(outlier_weight),
                           *self.robust.loss_names * self.robust.enabled)
        if critic not in mutual_info.CRITICS:
            raise ValueError(f"unknown critic {critic!r}; known: "
                             f"{', '.join(mutual_info.CRITICS)}")
        if mi_bound not in mutual_info.BOUNDS:
            raise ValueError(f"unknown MI bound {mi_bound!r}; known: "
                             f"{', '.join(mutual_info.BOUNDS)}")
        self.config = dict(
            num_classes=num_classes, input_shape=tuple(input_shape), n=n, rep_dim=rep_dim,
            critic=critic, alpha=alpha, beta=beta, gamma=gamma, margin=margin,
            mi_bound=mi_bound, critic_units=critic_units,
            local_stage=local_stage or mutual_info.DEFAULT_LOCAL_STAGE[critic],
            log_scale_floor=log_scale_floor, filters=tuple(filters),
            outlier_weight=outlier_weight, outlier_margin=outlier_margin)
        if self.robust.enabled:  # absent when off: configs saved before it load unchanged
            self.config["robust"] = self.robust.to_config()
        c = self.config
        self.encoder = ResNetEncoder(n, rep_dim, filters, c["local_stage"], name="encoder")
        self.critic = mutual_info.CRITICS[critic](critic_units, name="critic")
        self.class_conditional = ClassConditionalGaussians(
            num_classes, rep_dim, log_scale_floor, name="class_conditional")
        self._make_trackers()
        self.build((None, *c["input_shape"]))

    def build(self, input_shape):
        self.encoder.build(input_shape)
        self.critic.build(self._local_shape(input_shape), (None, self.config["rep_dim"]))
        self.class_conditional.build()
        self.built = True

    def call(self, images, training=None):
        _, z = self.encoder(images, training=training)
        return self.logits_from_features({"z": z})

    def logits_from_features(self, features: dict):
        """The head: encoder features (`ResNetEncoder.features`) -> summed log p(z|c)."""
        return self.class_conditional(features["z"])

    def log_likelihoods(self, images, training=None):
        """The summed log p(x|c) = log p(z|c) for every class, [N, C] (an alias of call)."""
        return self(images, training=training)

    def _loss_terms(self, images, labels, training, adversarial=None):
        c = self.config
        n = tf.shape(images)[0]
        count = tf.maximum(n // 4, 1)
        batch = [images]
        if c["outlier_weight"]:
            # One pass with the batch, so the mosaics share its normalisation: encoded apart
            # (moving statistics) they teach the encoder that inference-mode features are
            # outliers, and clean test images fall with them.
            batch.append(outliers.batch_mosaics(images, count))
        if adversarial is not None:  # last, in the same pass for the same reason
            batch.append(tf.cast(adversarial, images.dtype))
        local, encoded = self.encoder(tf.concat(batch, axis=0) if len(batch) > 1 else images,
                                      training=training)
        local, z = local[:n], encoded[:n]
        ll = self.class_conditional(z)
        per_dim_ll = ll / c["rep_dim"]
        if isinstance(self.critic, mutual_info.DotCritic):
            positive, negative = self.critic(local, z, training=training)
        else:
            positive, negative = self.critic(local, z)
        mi = mutual_info.mi_loss(positive, negative, c["mi_bound"])
        nll = losses.nll_loss(per_dim_ll, labels)
        lm = losses.likelihood_margin_loss(per_dim_ll, labels, c["margin"])
        total = c["alpha"] * mi + c["beta"] * nll + c["gamma"] * lm
        terms = {"mi_loss": mi, "nll_loss": nll, "lm_loss": lm}
        if c["outlier_weight"]:
            terms["om_loss"] = losses.outlier_margin_loss(
                self.class_conditional(encoded[n:n + count]) / c["rep_dim"],
                losses.true_class(per_dim_ll[:count], labels[:count]), c["outlier_margin"])
            total += c["outlier_weight"] * terms["om_loss"]
        if adversarial is not None:
            added, robust_terms = _robust.loss_terms(
                self.robust, self.class_conditional(encoded[-n:]) / c["rep_dim"], per_dim_ll,
                labels, c["margin"], c["beta"], c["gamma"])
            total += added
            terms.update(robust_terms)
        return {"loss": total, **terms}, ll


@keras.saving.register_keras_serializable(package="sdim_tf")
class DiscriminativeClassifier(_Classifier):
    """The paper's baseline: the same encoder with a C-way last layer and cross-entropy."""

    def __init__(self, num_classes: int, input_shape: Sequence[int] = (32, 32, 1), n: int = 1,
                 filters: Sequence[int] = (32, 64, 128, 256), **kwargs):
        super().__init__(**kwargs)
        self.config = dict(num_classes=num_classes, input_shape=tuple(input_shape), n=n,
                           filters=tuple(filters))
        self.encoder = ResNetEncoder(n, num_classes, filters, name="encoder")
        self._make_trackers()
        self.build((None, *self.config["input_shape"]))

    def build(self, input_shape):
        self.encoder.build(input_shape)
        self.built = True

    def call(self, images, training=None):
        return self.logits_from_features({"z": self.encoder(images, training=training)[1]})

    def logits_from_features(self, features: dict):
        """The head: encoder features -> logits (z is the C-way last layer), float32."""
        return keras.ops.cast(features["z"], "float32")

    def _loss_terms(self, images, labels, training):
        logits = self(images, training=training)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.cast(labels, tf.int32), logits))
        return {"loss": loss}, logits
