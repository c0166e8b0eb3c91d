"""Batch norms folded into the layers before them (sdim_tf.folding): the folded encoder's
features against the unfolded inference-mode ones and a numpy conv + batch norm, and the
folded export's answers against the unfolded export's, on real Fashion-MNIST images."""

import numpy as np
import pytest
import tensorflow as tf

from bench import untrained
from pipeline.run_dir import as_float32
from sdim_tf import data, density, encoder, folding, precision, publish, serving

FEATURES = ("local1", "local2", "local3", "local4", *density.LAYERS)


@pytest.fixture(scope="module")
def fashion(data_dir):
    """(train images [1024], train labels, test images [300]) of Fashion-MNIST, float32
    [N, 32, 32, 1] as serving_default takes them."""
    train, labels = data.load_split("fashion_mnist", "train", str(data_dir))
    test, _ = data.load_split("fashion_mnist", "test", str(data_dir))
    return (data.preprocess(train[:1024]).numpy(), labels[:1024],
            data.preprocess(test[:300]).numpy())


def _with_batch_norm_statistics(model, images, seed=0):
    """`model` with random batch-norm scales and offsets and moving statistics of real
    images: its encoder run in training mode on them until the statistics moved."""
    rng = np.random.default_rng(seed)
    for _, norm in model.encoder.normalized_layers():
        channels = norm.gamma.shape[0]
        norm.gamma.assign(rng.uniform(0.5, 1.5, channels).astype(np.float32))
        norm.beta.assign(rng.normal(0.0, 0.3, channels).astype(np.float32))
    for start in range(0, 10 * 128, 128):
        model.encoder(images[start % len(images):][:128], training=True)
    return model


@pytest.fixture(scope="module")
def classifier(fashion):
    return _with_batch_norm_statistics(untrained.model(), fashion[0])


def _assert_close(got, expected, tolerance=1e-5, name=""):
    """Equal within `tolerance` relative to each value and to the tensor's magnitude."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=tolerance,
                               atol=tolerance * np.abs(expected).max(), err_msg=name)


def test_statistics_are_not_trivial(classifier):
    """The folding tests below would pass on an identity norm: the statistics are not one."""
    for _, norm in classifier.encoder.normalized_layers():
        assert np.abs(norm.moving_mean.numpy()).max() > 0.05, norm.path
        assert np.abs(norm.moving_variance.numpy() - 1.0).max() > 0.05, norm.path
        assert np.abs(norm.gamma.numpy() - 1.0).max() > 0.1, norm.path


def test_a_folded_layer_is_numpys_conv_then_batch_norm(classifier, fashion):
    """The stem (a convolution without bias) and the head's dense layer (with bias), each
    with its batch norm, against numpy's formulas on the original weights."""
    encoder = classifier.encoder
    folded = folding.fold_encoder(encoder)
    x = fashion[2][:16].astype(np.float64)

    def batch_norm(y, norm):
        return ((y - norm.moving_mean.numpy()) / np.sqrt(norm.moving_variance.numpy()
                + norm.epsilon) * norm.gamma.numpy() + norm.beta.numpy())

    kernel = encoder.stem.kernel.numpy().astype(np.float64)  # [3, 3, 1, 32], "same", stride 1
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    conv = sum(padded[:, i:i + 32, j:j + 32, :] @ kernel[i, j]
               for i in range(3) for j in range(3))
    _assert_close(folded.stem_bn(folded.stem(x.astype(np.float32))),
                  batch_norm(conv, encoder.stem_bn), name="stem")
    h = encoder.features(fashion[2][:16], training=False)["stage4"].numpy().astype(np.float64)
    dense = h @ encoder.fc.kernel.numpy() + encoder.fc.bias.numpy()
    _assert_close(folded.fc_bn(folded.fc(h.astype(np.float32))),
                  batch_norm(dense, encoder.fc_bn), name="fc")


def test_folded_features_equal_the_inference_mode_ones(classifier, fashion):
    """Every feature the density can read (and the local maps), within float32 rounding;
    the trained encoder is left as it was."""
    encoder = classifier.encoder
    before = [w.numpy().copy() for w in encoder.weights]
    folded = folding.fold_encoder(encoder)
    images = fashion[2]
    expected = encoder.features(images, training=False)
    got = folded.features(images, training=False)
    for name in FEATURES:
        _assert_close(got[name], expected[name], name=name)
    for weight, value in zip(encoder.weights, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value, err_msg=weight.path)
    assert not any("moving" in w.path or "gamma" in w.path for w in folded.weights)
    assert len(folded.weights) < len(encoder.weights)


@pytest.mark.parametrize("side", [4, 8, 16])
def test_quadrant_sums_are_numpys_quadrant_means(side):
    """`quadrant_sums_pool`: each quadrant's mean per channel, laid out as
    `encoder.quadrant_pool` lays them (quadrant-major: top left, top right, bottom left,
    bottom right)."""
    x = np.random.default_rng(side).normal(size=(3, side, side, 5)).astype(np.float32)
    half = side // 2
    expected = np.stack([x[:, r:r + half, c:c + half].astype(np.float64).mean((1, 2))
                         for r in (0, half) for c in (0, half)], 1).reshape(3, 20)
    got = folding.quadrant_sums_pool(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, encoder.quadrant_pool(x), rtol=1e-6, atol=1e-6)


def test_a_bfloat16_model_folds_into_float32(fashion):
    """A model built under mixed_bfloat16 (as --mixed_precision=bfloat16 trains it) folds into
    a float32 encoder whose features are its float32 rebuild's (`as_float32`, what exports
    compute on), not the bf16 ones."""
    with precision.policy("mixed_bfloat16"):
        model = _with_batch_norm_statistics(untrained.model(), fashion[0], seed=1)
    folded = folding.fold_encoder(model.encoder)
    assert {w.dtype for w in folded.weights} == {"float32"}
    images = fashion[2][:64]
    expected = as_float32(model).encoder.features(images, training=False)
    got = folded.features(images, training=False)
    for name in FEATURES:
        assert got[name].dtype == tf.float32, name
        _assert_close(got[name], expected[name], name=name)
    bf16 = model.encoder.features(images, training=False)["head"]
    assert bf16.dtype == tf.bfloat16  # the unfolded model itself computes in bf16


@pytest.mark.parametrize("kind", ["sdim", "discriminative"])
def test_a_folded_classifier_scores_as_the_classifier(kind, classifier, fashion):
    """--score=model deploys the classifier itself: its folded class scores and logits (SDIM's
    log p(x|c), the baseline's logits) are its own within float32 rounding."""
    model = classifier if kind == "sdim" else _with_batch_norm_statistics(
        untrained.model(kind), fashion[0], seed=2)
    images = fashion[2][:64]
    expected = model.scores_and_logits(images)
    got = folding.FoldedScorer(model).scores_and_logits(images)
    for name, value, reference in zip(("scores", "logits"), got, expected, strict=True):
        _assert_close(value, reference, name=name)
    _assert_close(folding.FoldedScorer(model)(images), expected[0])


def _answers(function, images) -> dict:
    """`function`'s outputs on `images` in requests of 150 (within max_batch), as numpy."""
    parts = [function(images=tf.constant(images[i:i + 150]))
             for i in range(0, len(images), 150)]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def _convolution_filters(function) -> list[str]:
    """The op types feeding the filters of the convolutions `function` (a loaded signature)
    runs, in every function it calls."""
    library = function.graph.as_graph_def().library.function
    types = []
    for body in library:
        ops = {node.name: node.op for node in body.node_def}
        types += [ops[node.input[1].split(":")[0]] for node in body.node_def
                  if node.op == "Conv2D"]
    return types


def test_folded_export_answers_as_the_unfolded_module(classifier, fashion, tmp_path):
    """serving_default of the exported (folded) SavedModel against the unfolded module in
    memory, on 300 real test images with thresholds at the median score and min_gap at the
    gaps' 20th percentile: the same classes, refusals and reasons, scores within float32
    rounding."""
    train, labels, images = fashion
    scorer = density.FeatureDensity(classifier, 10)
    scorer.fit_features([(train, labels)], covariance="oas")
    module = serving.RejectingClassifier(scorer, np.zeros(10), 1, (28, 28), min_gap=0.0)
    first = _answers(lambda images: module.serving_default(images), images)
    module.thresholds.assign(np.full(10, np.median(first["score"]), np.float32))
    module.min_gap.assign(np.quantile(first["gap"], 0.2))
    path = publish.export(module, tmp_path, "m")  # folds by default
    assert b"moving_variance" not in (path / "saved_model.pb").read_bytes()  # folded
    expected = _answers(lambda images: module.serving_default(images), images)
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    got = _answers(signature, images)
    assert _convolution_filters(signature) == ["Const"] * 9  # stem + 4 blocks of 2
    assert 0.3 < expected["rejected"].mean() < 0.7
    assert (expected["reason"] == b"ambiguous").sum() > 10
    for key in ("class_ids", "class_name", "rejected", "reason", "threshold", "min_gap"):
        np.testing.assert_array_equal(got[key], expected[key], key)
    tolerance = 1e-5 * np.abs(expected["class_scores"]).max()
    for key in ("class_scores", "score", "gap"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=tolerance,
                                   err_msg=key)
    # softmax: a probability moves by at most twice the scores' largest move
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"],
                               atol=2 * tolerance)
