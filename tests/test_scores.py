"""The rejection scores behind the registry (sdim_tf.scores): fitting, saving and loading
the feature density, and the words reports and the model card use for each."""

import numpy as np
import pytest

import sdim_tf
from sdim_tf import density, scores


@pytest.fixture(scope="module")
def model_and_images():
    rng = np.random.default_rng(1)
    model = sdim_tf.SDIM(3, (32, 32, 1), rep_dim=8)
    images = rng.uniform(0, 1, (120, 32, 32, 1)).astype(np.float32)
    images[:40] *= 0.3  # three groups that differ, so the features do
    images[80:] = np.clip(images[80:] + 0.5, 0, 1)
    return model, images, np.repeat(np.arange(3), 40)


def test_registry_and_the_words_of_todays_reports():
    assert scores.SCORES.names() == ("feature_density", "model")
    assert scores.get("model") is scores.ModelScore
    with pytest.raises(ValueError, match="unknown score 'energy'; known: feature_density, "
                                         "model"):
        scores.get("energy")
    model_score, density_score = scores.ModelScore(), scores.FeatureDensityScore(
        layers=["quad3", "head"], split=True)
    assert model_score.description == ("the predicted class's output of the model (SDIM: "
                                       "log p(x|c))")
    assert density_score.description == (
        "the predicted class's summed standardised tied-Gaussian score on the encoder layers "
        "quad3, head (split terms) (sdim_tf.density; output class_scores)")
    assert (model_score.default_grouping, density_score.default_grouping) == (
        "per_class", "shared")
    assert scores.get("feature_density")(**density_score.settings()) == density_score
    assert scores.FeatureDensityScore().settings() == {
        "layers": list(density.DEFAULT_LAYERS), "split": density.DEFAULT_SPLIT,
        "covariance": "auto"}
    with pytest.raises(ValueError, match="covariance must be one of auto, sample, oas"):
        scores.FeatureDensityScore(covariance="ledoit")
    with pytest.raises(ValueError, match="layers must be a non-empty subset"):
        scores.FeatureDensityScore(layers=("stage9",))


def test_model_score_is_the_classifier(model_and_images, tmp_path):
    model, _, _ = model_and_images
    score = scores.ModelScore()
    assert score.fit(model) is model
    assert score.save(model, tmp_path) == [] and list(tmp_path.iterdir()) == []
    assert score.load(model, tmp_path) is model


def test_feature_density_fits_saves_and_loads(model_and_images, tmp_path):
    model, images, labels = model_and_images
    batches = [(images[i:i + 50], labels[i:i + 50]) for i in range(0, 120, 50)]
    score = scores.FeatureDensityScore(layers=("stage1", "z"), split=False)
    scorer = score.fit(model, batches)
    reference = density.FeatureDensity(model, 3, ("stage1", "z"), split=False)
    reference.fit_features(batches, covariance=score.covariance)
    queries = images[::7]
    expected = reference.predict(queries, verbose=0)
    np.testing.assert_array_equal(scorer.predict(queries, verbose=0), expected)
    assert score.save(scorer, tmp_path) == ["density.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["density.npz"]
    loaded = score.load(model, tmp_path)
    np.testing.assert_array_equal(loaded.predict(queries, verbose=0), expected)
    with pytest.raises(ValueError, match="pass batches"):
        score.fit(model)
    # a density of other layers, and an unreadable file, name the file and what is wrong
    other = scores.FeatureDensityScore(layers=("stage2",), split=False)
    with pytest.raises(ValueError, match=r"density.npz: layer stage2 lacks finite means "
                                         r"\[3, 64\] and a precision factor \[64, 64\]"):
        other.load(model, tmp_path)
    (tmp_path / "density.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="density.npz cannot be read"):
        score.load(model, tmp_path)
