"""FusedBatchNormalization: keras.layers.BatchNormalization's numbers on the fused kernel,
against Keras' layer and the textbook formulas (tests/references.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from sdim_tf import encoder, precision
from sdim_tf.fused_batch_norm import FusedBatchNormalization, unbiased_to_biased
from sdim_tf.model import SDIM
from tests import references

# 128 values per channel: the kernel's unbiased variance is 1/127 (0.8%) off the biased one
SHAPE = (8, 4, 4, 5)
MOMENTUM, EPSILON = 0.9, 1e-5
FLOAT32 = dict(rtol=1e-5, atol=1e-5)
BFLOAT16 = dict(rtol=2.0**-7, atol=1e-4)  # one bf16 rounding of the same float32 value


def _pair(policy: str = "float32", shape=SHAPE):
    """(Keras' layer, the fused one) built with the same random gamma, beta and moving
    statistics."""
    rng = np.random.default_rng(1)
    channels = shape[-1]
    weights = [rng.uniform(0.5, 2.0, channels), rng.normal(0, 1, channels),
               rng.normal(0, 1, channels), rng.uniform(0.5, 2.0, channels)]
    pair = []
    with precision.policy(policy):
        for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
            layer = cls(momentum=MOMENTUM, epsilon=EPSILON)
            layer.build((None, *shape[1:]))
            layer.set_weights([w.astype(np.float32) for w in weights])
            pair.append(layer)
    return pair


def _forward_backward(layer, x, upstream, training):
    """(y, dx, dgamma, dbeta) of sum(y * upstream), y = layer(x) in the layer's dtype."""
    x = tf.cast(x, layer.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]


def _assert_close(actual, expected, tolerance):
    """Entries within rtol, and atol of the largest expected entry."""
    actual = np.asarray(tf.cast(actual, tf.float32))
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=tolerance["rtol"],
                               atol=tolerance["atol"] * max(1.0, np.abs(expected).max()))


def _batches(steps: int, shape=SHAPE):
    """`steps` (images, upstream gradient) pairs, float32, the images off zero mean and unit
    variance so that both statistics matter."""
    rng = np.random.default_rng(0)
    return [(rng.normal(1.5, 3.0, shape).astype(np.float32),
             rng.normal(0, 1, shape).astype(np.float32)) for _ in range(steps)]


def _bf16(a):
    """The values float32 `a` has after rounding to bfloat16, as float64."""
    return tf.cast(tf.cast(a, tf.bfloat16), tf.float64).numpy()


@pytest.mark.parametrize("policy,tolerance", [("float32", FLOAT32),
                                              ("mixed_bfloat16", BFLOAT16)])
def test_training_steps_match_keras_and_the_textbook(policy, tolerance):
    keras_bn, fused = _pair(policy)
    moving = [np.asarray(fused.moving_mean, np.float64),
              np.asarray(fused.moving_variance, np.float64)]
    gamma, beta = np.asarray(fused.gamma, np.float64), np.asarray(fused.beta, np.float64)
    for x, upstream in _batches(3):
        ours = _forward_backward(fused, x, upstream, training=True)
        theirs = _forward_backward(keras_bn, x, upstream, training=True)
        assert ours[0].dtype == theirs[0].dtype == tf.as_dtype(fused.compute_dtype)
        assert ours[1].dtype == ours[0].dtype
        if policy == "float32":
            reference = references.batch_norm_training(x, upstream, gamma, beta, EPSILON)
        else:  # what both layers see: bf16 images, a bf16 upstream gradient
            reference = references.batch_norm_training(_bf16(x), _bf16(upstream), gamma,
                                                       beta, EPSILON)
        y, mean, variance, *gradients = reference
        for got, keras_value, expected in zip(ours, theirs, [y, *gradients], strict=True):
            _assert_close(got, keras_value, tolerance)
            _assert_close(got, expected, tolerance)
        moving = [m * MOMENTUM + s * (1 - MOMENTUM)
                  for m, s in zip(moving, (mean, variance), strict=True)]
        for ours_, theirs_, expected in zip(
                (fused.moving_mean, fused.moving_variance),
                (keras_bn.moving_mean, keras_bn.moving_variance), moving, strict=True):
            # float32 statistics of the same inputs in either precision
            _assert_close(ours_, theirs_, FLOAT32)
            _assert_close(ours_, expected, FLOAT32)


@pytest.mark.parametrize("policy,tolerance", [("float32", FLOAT32),
                                              ("mixed_bfloat16", BFLOAT16)])
def test_inference_matches_keras_and_the_formula(policy, tolerance):
    keras_bn, fused = _pair(policy)
    (x, upstream), = _batches(1)
    before = [w.copy() for w in fused.get_weights()]
    ours = _forward_backward(fused, x, upstream, training=False)
    theirs = _forward_backward(keras_bn, x, upstream, training=False)
    gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in before)
    if policy != "float32":
        x, upstream = _bf16(x), _bf16(upstream)
    expected = references.batch_norm_inference(x, upstream, gamma, beta, mean, variance,
                                               EPSILON)
    for got, keras_value, reference in zip(ours, theirs, expected, strict=True):
        _assert_close(got, keras_value, tolerance)
        _assert_close(got, reference, tolerance)
    for after, then in zip(fused.get_weights(), before, strict=True):
        np.testing.assert_array_equal(after, then)  # inference leaves the statistics alone


def test_a_frozen_layer_normalizes_by_its_moving_statistics():
    keras_bn, fused = _pair()
    fused.trainable = keras_bn.trainable = False
    (x, _), = _batches(1)
    before = fused.get_weights()
    gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in before)
    expected = gamma * (x - mean) / np.sqrt(variance + EPSILON) + beta
    _assert_close(fused(x, training=True), expected, FLOAT32)
    _assert_close(fused(x, training=True), keras_bn(x, training=True), FLOAT32)
    for after, then in zip(fused.get_weights(), before, strict=True):
        np.testing.assert_array_equal(after, then)


@pytest.mark.parametrize("shape,axis", [((16, 6), -1), ((4, 6, 3, 3), 1)])
def test_inputs_the_kernel_does_not_take_get_keras_computation(shape, axis):
    """2-D (the encoder's head) and channels-first inputs: Keras' own ops, bit for bit."""
    rng = np.random.default_rng(2)
    pair = [cls(axis=axis, momentum=MOMENTUM, epsilon=EPSILON)
            for cls in (keras.layers.BatchNormalization, FusedBatchNormalization)]
    x = rng.normal(1, 2, shape).astype(np.float32)
    outputs = [layer(x, training=True) for layer in pair]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    for a, b in zip(*(layer.get_weights() for layer in pair), strict=True):
        np.testing.assert_array_equal(a, b)
    mean = x.mean(tuple(i for i in range(len(shape)) if i != axis % len(shape)))
    np.testing.assert_allclose(pair[1].moving_mean, (1 - MOMENTUM) * mean, rtol=1e-6)


def test_unbiased_to_biased_undoes_the_kernels_correction():
    variance = tf.constant([2.0, 3.0])
    np.testing.assert_allclose(unbiased_to_biased(variance, 128), [2 * 127 / 128, 3 * 127 / 128],
                               rtol=1e-7)
    # the kernel leaves one value per channel unscaled (n / max(n - 1, 1))
    np.testing.assert_array_equal(unbiased_to_biased(variance, 1), [2.0, 3.0])
    x = tf.constant(np.random.default_rng(3).normal(0, 1, (2, 3, 1, 2)), tf.float32)
    _, _, kernel_variance = tf.compat.v1.nn.fused_batch_norm(x, tf.ones(2), tf.zeros(2),
                                                             is_training=True)
    np.testing.assert_allclose(unbiased_to_biased(kernel_variance, 6),
                               np.var(x.numpy(), axis=(0, 1, 2)), rtol=1e-6)


def test_config_weights_and_serialization_are_keras():
    keras_bn, fused = _pair()
    assert {k: v for k, v in fused.get_config().items() if k != "name"} == \
        {k: v for k, v in keras_bn.get_config().items() if k != "name"}
    assert [w.path.split("/")[-1] for w in fused.weights] == \
        [w.path.split("/")[-1] for w in keras_bn.weights] == \
        ["gamma", "beta", "moving_mean", "moving_variance"]
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fused))
    assert type(restored) is FusedBatchNormalization
    assert restored.get_config() == fused.get_config()


def _batch_norms(model):
    return [layer for layer in model.encoder._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


def test_a_model_saved_with_keras_batch_norm_loads_into_the_fused_encoder(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.random((16, 32, 32, 1), np.float32)
    labels = np.arange(16) % 10
    with encoder.batch_norm_class(keras.layers.BatchNormalization):
        saved = SDIM(10, (32, 32, 1))
    saved.compile()
    saved.fit(x, labels, batch_size=16, epochs=1, verbose=0)  # moving statistics move
    assert {type(bn) for bn in _batch_norms(saved)} == {keras.layers.BatchNormalization}
    path = tmp_path / "keras_batch_norm.keras"
    saved.save(path)

    loaded = keras.models.load_model(path)
    norms = _batch_norms(loaded)
    assert len(norms) == 2 + 2 * 4 and {type(bn) for bn in norms} == {FusedBatchNormalization}
    assert len(loaded.weights) == len(saved.weights)
    for a, b in zip(loaded.weights, saved.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(norms[0].moving_variance.numpy(), 1.0)
    expected = saved.predict(x, verbose=0)
    _assert_close(loaded.predict(x, verbose=0), expected, FLOAT32)
    # training goes on from the same statistics
    loaded.fit(x, labels, batch_size=16, epochs=1, verbose=0)
    saved.fit(x, labels, batch_size=16, epochs=1, verbose=0)
    for a, b in zip(_batch_norms(loaded), _batch_norms(saved), strict=True):
        _assert_close(a.moving_mean, b.moving_mean, FLOAT32)
        _assert_close(a.moving_variance, b.moving_variance, FLOAT32)


def test_mirrored_strategy_one_replica():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        keras_bn, fused = _pair()
    (x, upstream), = _batches(1)
    gamma, beta = np.asarray(fused.gamma, np.float64), np.asarray(fused.beta, np.float64)
    moving = [np.asarray(fused.moving_mean, np.float64),
              np.asarray(fused.moving_variance, np.float64)]

    @tf.function
    def step():
        return [strategy.run(_forward_backward, args=(layer, x, upstream, True))
                for layer in (fused, keras_bn)]

    ours, theirs = step()
    y, mean, variance, *gradients = references.batch_norm_training(x, upstream, gamma, beta,
                                                                   EPSILON)
    for got, keras_value, expected in zip(ours, theirs, [y, *gradients], strict=True):
        _assert_close(got, keras_value, FLOAT32)
        _assert_close(got, expected, FLOAT32)
    for variable, statistic, before in zip((fused.moving_mean, fused.moving_variance),
                                           (mean, variance), moving, strict=True):
        _assert_close(variable, before * MOMENTUM + statistic * (1 - MOMENTUM), FLOAT32)


def test_one_xla_cluster_computes_the_same():
    """--jit_compile (XLA, the default with a GPU) compiles the fused kernel too."""
    _, fused = _pair()
    (x, upstream), = _batches(1)
    gamma, beta = np.asarray(fused.gamma, np.float64), np.asarray(fused.beta, np.float64)
    moving = np.asarray(fused.moving_variance, np.float64)
    compiled = tf.function(lambda: _forward_backward(fused, x, upstream, True), jit_compile=True)
    y, _, variance, *gradients = references.batch_norm_training(x, upstream, gamma, beta,
                                                                EPSILON)
    for got, expected in zip(compiled(), [y, *gradients], strict=True):
        _assert_close(got, expected, FLOAT32)
    _assert_close(fused.moving_variance, moving * MOMENTUM + variance * (1 - MOMENTUM), FLOAT32)
