"""Post-hoc tied Gaussians (sdim_tf.density) against numpy's LDA formulas."""

import numpy as np
import pytest

import sdim_tf
from sdim_tf import density, explain
from tests.references import numpy_scores as _numpy_scores
from tests.references import whitened_scores


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


def _grouped(rng, n, dim, num_classes=3):
    """Features of `num_classes` shifted groups with a low-rank (anisotropic) covariance."""
    labels = np.arange(n) % num_classes
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(1.0, 1e-2, dim)
    x = rng.normal(size=(n, dim)) @ mixing.T + 2.0 * labels[:, None]
    return x, labels


def test_oas_is_scikit_learns_on_the_class_centred_features():
    from sklearn.covariance import OAS

    rng = np.random.default_rng(3)
    x, labels = _grouped(rng, 60, 40)
    stats = density.TiedGaussianStats(3, 40)
    for i in range(0, 60, 25):
        stats.update(x[i:i + 25], labels[i:i + 25])
    means, shrunk = stats.covariance(ridge=0.0, covariance="oas")
    centred = x - np.stack([x[labels == c].mean(0) for c in range(3)])[labels]
    reference = OAS(assume_centered=True).fit(centred)
    np.testing.assert_allclose(shrunk, reference.covariance_, rtol=1e-9, atol=1e-12)
    pooled = stats.covariance(ridge=0.0)[1]
    assert density.oas_shrinkage(pooled, 60) == pytest.approx(reference.shrinkage_, rel=1e-9)
    assert 0 < reference.shrinkage_ < 1
    means, factor = stats.fit(ridge=0.0, covariance="oas")
    np.testing.assert_allclose(factor @ factor.T, np.linalg.inv(reference.covariance_),
                               rtol=1e-6)


def test_held_out_log_density_is_scipys_for_both_estimators():
    from scipy import stats as scipy_stats
    from sklearn.covariance import OAS

    rng = np.random.default_rng(4)
    x, labels = _grouped(rng, 50, 12)
    held = np.arange(50) % 4 == 0
    fitted, held_out = density.TiedGaussianStats(3, 12), density.TiedGaussianStats(3, 12)
    fitted.update(x[~held], labels[~held])
    held_out.update(x[held], labels[held])
    got = density.held_out_log_density(fitted, held_out, ridge=1e-3)
    fx, fl = x[~held], labels[~held]
    means = np.stack([fx[fl == c].mean(0) for c in range(3)])
    centred = fx - means[fl]
    for kind, covariance in (("sample", centred.T @ centred / len(fx)),
                             ("oas", OAS(assume_centered=True).fit(centred).covariance_)):
        covariance = covariance + 1e-3 * np.trace(covariance) / 12 * np.eye(12)
        expected = np.mean([scipy_stats.multivariate_normal(means[c], covariance).logpdf(v)
                            for v, c in zip(x[held], labels[held], strict=True)])
        assert got[kind] == pytest.approx(expected, rel=1e-9)


def _fold_reference(x, labels, kind, ridge, folds=density.FOLDS):
    """Mean over folds (image i in fold i % folds) of the held-out images' mean log-density
    under the estimator fitted, by the textbook, on the other folds."""
    from scipy import stats as scipy_stats
    from sklearn.covariance import OAS

    values = []
    for k in range(folds):
        held = np.arange(len(x)) % folds == k
        fx, fl = x[~held], labels[~held]
        means = np.stack([fx[fl == c].mean(0) for c in range(3)])
        centred = fx - means[fl]
        cov = (OAS(assume_centered=True).fit(centred).covariance_ if kind == "oas"
               else centred.T @ centred / len(fx))
        cov = cov + ridge * np.trace(cov) / len(cov) * np.eye(len(cov))
        values.append(np.mean([scipy_stats.multivariate_normal(means[c], cov).logpdf(v)
                               for v, c in zip(x[held], labels[held], strict=True)]))
    return float(np.mean(values))


def test_auto_covariance_follows_its_rule_and_the_held_out_folds():
    rng = np.random.default_rng(5)
    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=16)
    images = rng.uniform(0, 1, (90, 32, 32, 1)).astype(np.float32)
    images[30:60] *= 0.3
    images[60:] = np.clip(images[60:] + 0.5, 0, 1)
    labels = np.repeat(np.arange(3), 30)
    order = rng.permutation(90)  # any order: folds go by position in the stream
    images, labels = images[order], labels[order]
    scorer = density.FeatureDensity(model, 3, ("stage1", "z"), split=False)
    batches = [(images[i:i + 40], labels[i:i + 40]) for i in range(0, 90, 40)]
    assert scorer.fit_features(batches, covariance="auto") == 90
    features = {k: v.numpy().astype(np.float64) for k, v in
                model.encoder.features(images, training=False).items()}
    for layer in ("stage1", "z"):
        record, dim = scorer.fit_record[layer], features[layer].shape[1]
        assert (record["images"], record["dimensions"]) == (90, dim) and 90 < 10 * dim
        expected = {kind: _fold_reference(features[layer], labels, kind, 1e-6)
                    for kind in density.ESTIMATORS}
        for kind, value in record["held_out_log_density"].items():
            assert value == pytest.approx(expected[kind], abs=1e-3 + 1e-6 * abs(expected[kind]))
        assert record["covariance"] == max(expected, key=expected.get)
        assert "held-out training images over 5 folds" in record["why"]
    # the chosen estimator is the one fitted
    chosen = density.TiedGaussianStats(3, features["z"].shape[1])
    chosen.update(features["z"], labels)
    means, factor = chosen.fit(1e-6, scorer.fit_record["z"]["covariance"])
    np.testing.assert_allclose(scorer.density_scores.precision_factors["z"].numpy(), factor,
                               rtol=1e-4, atol=1e-4 * np.abs(factor).max())


def test_enough_images_keep_the_sample_covariance_bit_for_bit():
    rng = np.random.default_rng(6)
    x, labels = _grouped(rng, 400, 8)  # 400 >= 10 x 8
    stats = density.TiedGaussianStats(3, 8)
    stats.update(x, labels)
    record = density.choose_covariance(stats, None)
    assert record == {"images": 400, "dimensions": 8, "covariance": "sample",
                      "why": "400 images >= 10 x 8 dimensions", "shrinkage": 0.0}
    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8)
    images = rng.uniform(0, 1, (200, 32, 32, 1)).astype(np.float32)
    batches = [(images[i:i + 64], np.arange(i, min(i + 64, 200)) % 3)
               for i in range(0, 200, 64)]
    auto = density.FeatureDensity(model, 3, ("z",), split=False)
    auto.fit_features(batches, covariance="auto")  # 200 >= 10 x 8 (z)
    sample = density.FeatureDensity(model, 3, ("z",), split=False)
    sample.fit_features(batches)
    for key, value in sample.parameters().items():
        np.testing.assert_array_equal(auto.parameters()[key], value)
    assert auto.fit_record["z"]["covariance"] == "sample"
    few = density.TiedGaussianStats(3, 8)
    few.update(x[:7], labels[:7])  # fewer images than dimensions: no folds needed
    assert density.choose_covariance(few, None) == {
        "images": 7, "dimensions": 8, "covariance": "oas", "shrinkage": round(
            density.oas_shrinkage(few.covariance(0.0)[1], 7), 6),
        "why": "7 images < 8 dimensions: the sample covariance is singular"}
    with pytest.raises(ValueError, match="covariance must be one of auto, sample, oas"):
        sample.fit_features(batches, covariance="ledoit")


@pytest.mark.parametrize("n, dim, spread, chosen", [(90, 20, 1e-2, "sample"),
                                                    (60, 40, 1e-2, "oas")])
def test_held_out_folds_choose_either_estimator(n, dim, spread, chosen):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(1.0, spread, dim)
    x = rng.normal(size=(n, dim)) @ mixing.T + 2.0 * labels[:, None]
    stats = density.TiedGaussianStats(3, dim)
    stats.update(x, labels)
    folds = [density.TiedGaussianStats(3, dim) for _ in range(density.FOLDS)]
    for k, fold in enumerate(folds):
        held = np.arange(n) % density.FOLDS == k
        fold.update(x[held], labels[held])
    record = density.choose_covariance(stats, folds)
    expected = {kind: _fold_reference(x, labels, kind, 1e-6) for kind in density.ESTIMATORS}
    assert max(expected, key=expected.get) == record["covariance"] == chosen
    for kind, value in record["held_out_log_density"].items():
        assert value == pytest.approx(expected[kind], abs=1e-3)
    pooled = stats.covariance(0.0)[1]
    assert record["shrinkage"] == (round(density.oas_shrinkage(pooled, n), 6)
                                   if chosen == "oas" else 0.0)


def _gaussians(rng, num_classes, dim):
    """Class means and the Cholesky factor of an anisotropic precision, and features of the
    classes plus far outliers."""
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(1.0, 1e-2, dim)
    means = rng.normal(size=(num_classes, dim)) * 3.0 + 5.0
    covariance = mixing @ mixing.T + 1e-3 * np.eye(dim)
    factor = np.linalg.cholesky(np.linalg.inv(covariance))
    labels = np.arange(40) % num_classes
    x = rng.normal(size=(40, dim)) @ mixing.T + means[labels]
    x[30:] = rng.uniform(0.0, 20.0, size=(10, dim))  # outliers
    return means, factor, x


# (C, d, block, split): several column blocks, one, a last narrower one, and a joint layer
# of fewer dimensions than C-1 (its span is all of it)
@pytest.mark.parametrize("num_classes, dim, block, split", [
    (10, 40, 16, True), (10, 40, 16, False), (10, 33, 32, True), (3, 50, 7, True),
    (3, 50, 7, False), (2, 20, 64, True), (10, 4, 16, False)])
def test_folded_form_is_the_whitened_formula(num_classes, dim, block, split):
    """`fold`'s form, constant - ||z_span - targets||^2 - ||z_rest||^2 with z = (x - center)
    [G | T] and T read in triangular column blocks, evaluated in float64, against the
    whitening-then-projecting formula."""
    rng = np.random.default_rng(dim + block)
    means, factor, x = _gaussians(rng, num_classes, dim)
    folded = density.fold(means, factor, split, block=block)
    centred = x - folded.center
    first, *later = folded.blocks
    z = np.concatenate([centred @ first] + [centred[:, dim - len(b):] @ b for b in later], 1)
    k = folded.targets.shape[1]
    got = (folded.constant - ((z[:, None, :k] - folded.targets[None]) ** 2).sum(-1)
           - (z[:, k:] ** 2).sum(-1, keepdims=True))
    expected = whitened_scores(x, means, factor, split)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    # the blocks hold a lower-triangular factor: each starts at its first column's row
    assert k == min(num_classes - 1, dim) and first.shape == (dim, k + min(block, dim))
    assert [len(b) for b in later] == list(range(dim - block, 0, -block))
    # the graph that serves it, run in float64 (one block at these sizes)
    np.testing.assert_allclose(density.standardized_scores(x, means, factor, split).numpy(),
                               expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("split", [True, False])
def test_layer_scores_in_float32_match_the_float64_formula(split):
    """The layer as a call and `summed` compute it (float32, the default block of 256
    columns: a layer of 600 features takes three) against the unfolded formula in float64,
    on the float32 parameters it keeps."""
    rng = np.random.default_rng(7)
    # joint terms take a layer of fewer dimensions than C-1 (its span: all of it)
    dims = {"wide": 600, "narrow": 24, **({} if split else {"tiny": 4})}
    layer = density.TiedGaussianScores(10, dims, split=split)
    expected, features = 0.0, {}
    for name, dim in dims.items():
        means, factor, x = _gaussians(rng, 10, dim)
        layer.set_gaussians(name, means, factor)
        features[name] = x.astype(np.float32)
        expected = expected + whitened_scores(
            x.astype(np.float32).astype(np.float64), means.astype(np.float32).astype(np.float64),
            factor.astype(np.float32).astype(np.float64), split)
    assert len(layer.blocks["wide"]) == 3
    scale = np.abs(expected).max()
    # `summed` (what a folded export serves) is the same sum in fewer ops
    for got in (layer(features).numpy(), layer.summed(features).numpy()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6 * scale)
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
