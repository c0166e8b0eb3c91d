"""SDIM and the discriminative baseline: parameter counts, gradients, saving, fitting."""

import numpy as np
import pytest
import tensorflow as tf

import sdim_tf
from sdim_tf import data


def _resnet10_trunk(channels=1, filters=(32, 64, 128, 256)):
    """Trainable parameters of the ResNet10 trunk + 256-unit head, counted by hand."""
    count = 9 * channels * filters[0] + 2 * filters[0]  # stem conv + BN
    previous = filters[0]
    for f in filters:  # one BasicBlock per stage: two 3x3 convs + two BNs
        count += 9 * previous * f + 9 * f * f + 4 * f
        previous = f
    return count + (filters[-1] * 256 + 256) + 2 * 256  # Dense(256) + BN


def test_parameter_counts_match_the_paper():
    disc = sdim_tf.DiscriminativeClassifier(10, (32, 32, 1))
    assert disc.trainable_parameter_count() == 1_250_794 == _resnet10_trunk() + 256 * 10 + 10
    dot = sdim_tf.SDIM(10, (32, 32, 1), critic="dot").trainable_parameter_count()
    assert abs(dot - 1_465_120) / 1_465_120 < 0.01
    concat = sdim_tf.SDIM(10, (32, 32, 1), critic="concat").trainable_parameter_count()
    critic = (256 + 64) * 256 + 256 + 256 * 256 + 256 + 256 + 1
    assert concat == _resnet10_trunk() + 256 * 64 + 64 + 10 * 128 + critic  # 1,414,177


def test_encoder_shapes_and_local_stage():
    x = tf.zeros((2, 32, 32, 3))
    for stage, size, channels in ((4, 4, 256), (2, 16, 64), (1, 32, 32)):
        encoder = sdim_tf.ResNetEncoder(n=3, rep_dim=7, local_stage=stage)
        local, z = encoder(x)
        assert local.shape == (2, size, size, channels) and z.shape == (2, 7)
    encoder = sdim_tf.ResNetEncoder(n=3)
    encoder.build((None, 32, 32, 1))
    conv_layers = [w for w in encoder.weights if "kernel" in w.path and len(w.shape) == 4]
    assert len(conv_layers) == 8 * 3 + 1  # 8n+1 conv layers, + the last dense = 8n+2


@pytest.mark.parametrize("shape, stride", [((2, 8, 6, 3), 2), ((1, 9, 6, 2), 3),
                                           ((2, 7, 8, 1), 2)])
def test_shortcut_subsampling_is_the_strided_slice(shape, stride):
    """Bit for bit, in a tf.function and in its gradient (sides that do not divide take the
    strided slice itself)."""
    from sdim_tf.encoder import subsample

    x = tf.constant(np.random.default_rng(0).normal(size=shape), tf.float32)
    weights = tf.constant(np.random.default_rng(1).normal(
        size=np.array(x[:, ::stride, ::stride].shape)), tf.float32)
    for fn in (subsample, tf.function(subsample, reduce_retracing=True)):
        np.testing.assert_array_equal(fn(x, stride).numpy(), x[:, ::stride, ::stride].numpy())
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(subsample(x, stride) * weights)
    expected = np.zeros(shape, np.float32)
    expected[:, ::stride, ::stride] = weights.numpy()
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown critic 'mlp'"):
        sdim_tf.SDIM(10, critic="mlp")
    with pytest.raises(ValueError, match="local_stage must be"):
        sdim_tf.ResNetEncoder(local_stage=5)


@pytest.mark.parametrize("critic", ["concat", "dot"])
def test_gradients_reach_every_trainable_variable(critic):
    model = sdim_tf.SDIM(4, (32, 32, 1), critic=critic, rep_dim=8)
    x = tf.random.stateless_uniform((6, 32, 32, 1), [1, 2])
    y = tf.constant([0, 1, 2, 3, 0, 1])
    with tf.GradientTape() as tape:
        terms, logits = model._loss_terms(x, y, training=True)
    grads = tape.gradient(terms["loss"], model.trainable_variables)
    assert logits.shape == (6, 4)
    for var, grad in zip(model.trainable_variables, grads, strict=True):
        assert grad is not None, var.path
        assert float(tf.reduce_max(tf.abs(grad))) > 0, var.path


def test_loss_terms_combine_with_weights():
    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8, alpha=0.5, beta=2.0, gamma=0.25)
    x = tf.random.stateless_uniform((4, 32, 32, 1), [3, 4])
    terms, ll = model._loss_terms(x, tf.constant([0, 1, 2, 0]), training=False)
    expected = 0.5 * terms["mi_loss"] + 2.0 * terms["nll_loss"] + 0.25 * terms["lm_loss"]
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(terms["nll_loss"],
                               sdim_tf.losses.nll_loss(ll / 8, [0, 1, 2, 0]), rtol=1e-6)


def test_outlier_margin_term_on_batch_mosaics():
    """With outlier_weight, the loss adds the weighted outlier term of 2x2 mosaics of a
    quarter of the batch, encoded in the batch's own pass (in training, its batch-norm
    statistics; apart, with the moving ones, the term once taught the encoder to push every
    inference-mode image down: test accuracy of the model's score fell to 29%)."""
    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8, outlier_weight=0.5, outlier_margin=2.0)
    x = tf.random.stateless_uniform((8, 32, 32, 1), [5, 6])
    y = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    terms, ll = model._loss_terms(x, y, training=False)
    assert set(terms) == {"loss", "mi_loss", "nll_loss", "lm_loss", "om_loss"}
    np.testing.assert_allclose(terms["loss"], terms["mi_loss"] + terms["nll_loss"]
                               + terms["lm_loss"] + 0.5 * terms["om_loss"], rtol=1e-6)
    # the mosaics by hand: quadrants of images 0-3 and 1-4 (numpy), their log-likelihoods
    # from the model itself, the reference the first images' true classes
    images = x.numpy()
    mosaics = np.stack([np.concatenate([
        np.concatenate([images[i][:16, :16], images[i + 1][:16, 16:]], axis=1),
        np.concatenate([images[i + 2][16:, :16], images[i + 3][16:, 16:]], axis=1)])
        for i in (0, 1)])
    outlier_ll = model(mosaics, training=False).numpy() / 8
    reference = ll.numpy()[[0, 1], [0, 1]] / 8
    expected = np.mean(np.maximum(outlier_ll.max(1) + 2.0 - reference, 0.0) ** 2)
    np.testing.assert_allclose(terms["om_loss"], expected, rtol=1e-4)
    assert float(terms["om_loss"]) > 0  # an untrained model has not separated them
    # in training the mosaics are normalised with the batch: the model on batch + mosaics
    terms, ll = model._loss_terms(x, y, training=True)
    joint = model(np.concatenate([images, mosaics]), training=True).numpy() / 8
    np.testing.assert_allclose(ll.numpy() / 8, joint[:8], rtol=1e-4, atol=1e-4)
    expected = np.mean(np.maximum(joint[8:].max(1) + 2.0 - joint[[0, 1], [0, 1]], 0.0) ** 2)
    np.testing.assert_allclose(terms["om_loss"], expected, rtol=1e-4)
    # the paper's objective when off: no fifth term
    assert "om_loss" not in sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8)._loss_terms(
        x, y, training=False)[0]
    with pytest.raises(ValueError, match="outlier_weight must be >= 0"):
        sdim_tf.SDIM(3, outlier_weight=-1.0)


@pytest.mark.parametrize("cls,kwargs", [
    (sdim_tf.SDIM, {"critic": "dot", "margin": 5.0}),
    (sdim_tf.SDIM, {"critic": "concat", "outlier_weight": 0.1, "outlier_margin": 4.0}),
    (sdim_tf.SDIM, {"critic": "concat", "log_scale_floor": -3.9}),
    (sdim_tf.SDIM, {"robust": {"epsilon": 0.1, "attack": "fgsm", "mode": "both"}}),
    (sdim_tf.DiscriminativeClassifier, {}),
])
def test_keras_round_trip(tmp_path, cls, kwargs):
    import keras

    model = cls(10, (32, 32, 1), **kwargs)
    model.compile()
    x = np.random.default_rng(0).random((8, 32, 32, 1), np.float32)
    model.fit(x, np.arange(8) % 10, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is cls and loaded.get_config() == model.get_config()
    assert int(loaded.optimizer.iterations) == 1  # optimizer state travels too
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("critic", ["concat", "dot"])
def test_sdim_fits_real_fashion_mnist(data_dir, critic):
    import keras

    keras.utils.set_random_seed(0)
    images, labels = data.load_split("fashion_mnist", "train", data_dir=str(data_dir))
    x = data.preprocess(images[:256]).numpy()
    y = labels[:256]
    model = sdim_tf.SDIM(10, (32, 32, 1), critic=critic)
    model.compile()
    model.fit(x, y, batch_size=64, epochs=25, verbose=0)
    predicted = np.argmax(model.predict(x, batch_size=256, verbose=0), axis=1)
    assert (predicted == y).mean() >= 0.95
