"""Post-hoc tied Gaussians (sdim_tf.density) against numpy's LDA formulas."""

import numpy as np
import pytest

import sdim_tf
from sdim_tf import density, explain
from tests.references import numpy_scores as _numpy_scores


def test_streaming_fit_is_the_pooled_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)) + 3.0
    labels = rng.integers(0, 3, 300)
    stats = density.TiedGaussianStats(3, 4)
    for i in range(0, 300, 70):  # uneven batches
        stats.update(x[i:i + 70], labels[i:i + 70])
    means, factor = stats.fit(ridge=0.0)
    expected_means = np.stack([x[labels == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(means, expected_means, rtol=1e-12)
    covariance = np.cov((x - expected_means[labels]).T, bias=True)
    np.testing.assert_allclose(factor @ factor.T, np.linalg.inv(covariance), rtol=1e-8)
    assert np.allclose(factor, np.tril(factor))


def test_missing_class_and_bad_layers_are_clear_errors():
    stats = density.TiedGaussianStats(3, 2)
    stats.update(np.ones((4, 2)), np.array([0, 0, 2, 2]))
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        stats.fit()
    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8)
    with pytest.raises(ValueError, match="layers must be a non-empty subset"):
        density.FeatureDensity(model, 3, ("stage9",))
    scorer = density.FeatureDensity(model, 3, ("z",))
    images = np.zeros((4, 32, 32, 1), np.float32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        scorer.fit_features([(images, np.array([0, 1, 2, 3]))])


@pytest.mark.parametrize("cls, kwargs", [(sdim_tf.SDIM, {"rep_dim": 8}),
                                         (sdim_tf.DiscriminativeClassifier, {})])
def test_scores_match_numpy_and_have_chi_square_mean(cls, kwargs):
    rng = np.random.default_rng(1)
    model = cls(3, (32, 32, 1), **kwargs)
    images = rng.uniform(0, 1, (120, 32, 32, 1)).astype(np.float32)
    images[:40] *= 0.3  # three groups that differ, so the features do
    images[80:] = np.clip(images[80:] + 0.5, 0, 1)
    labels = np.repeat(np.arange(3), 40)
    layers = ("stage1", "stage4", "z")
    scorer = density.FeatureDensity(model, 3, layers, split=False)
    ridge = 1e-3
    assert scorer.fit_features([(images[i:i + 50], labels[i:i + 50])
                                for i in range(0, 120, 50)], ridge=ridge) == 120
    features = model.encoder.features(images, training=False)
    features = {k: features[k].numpy() for k in layers}
    queries = rng.uniform(0, 1, (7, 32, 32, 1)).astype(np.float32)
    query_features = {k: v.numpy() for k, v in
                      model.encoder.features(queries, training=False).items() if k in layers}
    expected = _numpy_scores(features, labels, query_features, 3, ridge)
    got = scorer.predict(queries, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())

    # Without ridge the mean squared distance of the fit samples to their own class mean is
    # exactly d (trace of the inverse covariance times the covariance): mean score 0.
    exact = density.FeatureDensity(model, 3, ("stage1",), split=False)
    exact.fit_features([(images, labels)], ridge=0.0)
    own = exact.predict(images, verbose=0)[np.arange(120), labels]
    assert abs(own.mean()) < 1e-3 * np.abs(own).max()

    # One encoder pass gives both the scores and the classifier's own logits.
    scores, logits = scorer.scores_and_logits(queries)
    np.testing.assert_allclose(scores.numpy(), got, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(logits.numpy(), model.predict(queries, verbose=0), rtol=1e-5,
                               atol=1e-4)

    # The functional view (for the attribution maps) is the scorer, on shared weights.
    view = explain.functional_view(scorer)
    np.testing.assert_allclose(view.predict(queries, verbose=0), got, rtol=1e-4,
                               atol=1e-4 * np.abs(got).max())
    assert {id(v) for v in view.weights} <= {id(v) for v in scorer.weights}

    # Parameters round-trip into a fresh scorer.
    fresh = density.FeatureDensity(model, 3, layers, split=False)
    fresh.load_parameters(scorer.parameters())
    np.testing.assert_array_equal(fresh.predict(queries, verbose=0), got)


def test_empty_batch_scores_without_running_the_network():
    """Every library scoring path answers an empty batch with [0, C] (eager and graph)."""
    import tensorflow as tf

    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8)
    scorer = density.FeatureDensity(model, 3, ("stage2", "head"))
    empty, one = tf.zeros((0, 32, 32, 1)), tf.zeros((1, 32, 32, 1))
    discriminative = sdim_tf.DiscriminativeClassifier(3)
    paths = {"SDIM": lambda x: model(x, training=False),
             "discriminative": lambda x: discriminative(x, training=False),
             "FeatureDensity": lambda x: scorer(x),
             "scores_and_logits": lambda x: scorer.scores_and_logits(x)[0]}
    for name, path in paths.items():
        for fn in (path, tf.function(path)):
            assert fn(empty).shape == (0, 3), name
            assert fn(one).shape == (1, 3), name
    features = tf.function(lambda x: model.encoder.features(x, training=False))(empty)
    assert features["local2"].shape == (0, 16, 16, 64) and features["head"].shape == (0, 256)


def test_split_terms_match_the_projection_in_the_precision_metric():
    rng = np.random.default_rng(2)
    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8)
    images = rng.uniform(0, 1, (120, 32, 32, 1)).astype(np.float32)
    images[:40] *= 0.3
    images[80:] = np.clip(images[80:] + 0.5, 0, 1)
    labels = np.repeat(np.arange(3), 40)
    layers, ridge = ("stage1", "z"), 1e-3
    scorer = density.FeatureDensity(model, 3, layers, split=True)
    scorer.fit_features([(images, labels)], ridge=ridge)
    features = {k: v.numpy() for k, v in model.encoder.features(images, training=False).items()
                if k in layers}
    queries = rng.uniform(0, 1, (7, 32, 32, 1)).astype(np.float32)
    query_features = {k: v.numpy() for k, v in
                      model.encoder.features(queries, training=False).items() if k in layers}
    expected = _numpy_scores(features, labels, query_features, 3, ridge, split=True)
    got = scorer.predict(queries, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    joint = _numpy_scores(features, labels, query_features, 3, ridge)
    assert np.abs(got - joint).max() > 0.1 * np.abs(joint).max()  # a different score
    # round trip through the saved parameters
    fresh = density.FeatureDensity(model, 3, layers, split=True)
    fresh.load_parameters(scorer.parameters())
    np.testing.assert_allclose(fresh.predict(queries, verbose=0), got, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="split terms need layers of more than 2"):
        density.TiedGaussianScores(3, {"tiny": 2}, split=True)
