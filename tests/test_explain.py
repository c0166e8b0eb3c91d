"""Explanations: the functional view is the model; maps, PCA and the explain stage's pictures."""

import numpy as np
import pytest
from PIL import Image

import sdim_tf
from pipeline import artifacts
from pipeline.run_dir import Run
from pipeline.stages import explain as explain_stage
from sdim_tf import explain, plots


def _with_moving_statistics(model):
    """One training step so batch-norm moving statistics differ from their initial values."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (16, 32, 32, 1)).astype(np.float32)
    model.compile()
    model.fit(images, rng.integers(0, 3, 16), batch_size=16, epochs=1, verbose=0)
    return rng.uniform(0, 1, (5, 32, 32, 1)).astype(np.float32)


@pytest.mark.parametrize("cls, kwargs", [(sdim_tf.SDIM, {"rep_dim": 8}),
                                         (sdim_tf.DiscriminativeClassifier, {})])
def test_functional_view_gives_the_models_logits(cls, kwargs):
    model = cls(3, (32, 32, 1), **kwargs)
    images = _with_moving_statistics(model)
    view = explain.functional_view(model)
    np.testing.assert_allclose(view.predict(images, verbose=0),
                               model.predict(images, verbose=0), rtol=1e-5, atol=1e-4)
    assert {id(v) for v in view.weights} <= {id(v) for v in model.weights}  # shared
    assert view.get_layer(explain.last_block_name(model)).name == "stage4_block1"


def test_the_scatter_draws_a_star_per_class_mean(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    scatter = matplotlib.axes.Axes.scatter

    def recording(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("marker"), np.column_stack([x, y])))
        return scatter(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", recording)
    rng = np.random.default_rng(4)
    points, means = rng.normal(size=(40, 2)), rng.normal(size=(3, 2))
    plots.representation_scatter(points, np.arange(40) % 3, ["a", "b", "c"],
                                 tmp_path / "r.png", means=means, ood=rng.normal(size=(5, 2)))
    stars = [xy for marker, xy in drawn if marker == "*"]
    assert len(stars) == 1
    np.testing.assert_array_equal(stars[0], means)
    assert [len(xy) for marker, xy in drawn if marker == "x"] == [5]


def test_pca_matches_the_eigen_decomposition():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(200, 5)) @ np.diag([5.0, 2.0, 1.0, 0.5, 0.1])
    project, ratios = explain.pca(points)
    centred = points - points.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))
    order = np.argsort(values)[::-1]
    np.testing.assert_allclose(ratios, values[order][:2] / values.sum(), rtol=1e-10)
    reference = centred @ vectors[:, order[:2]]
    ours = project(points)
    for k in range(2):  # eigenvectors are defined up to sign
        sign = np.sign(ours[:, k] @ reference[:, k])
        np.testing.assert_allclose(ours[:, k], sign * reference[:, k], atol=1e-9)


def test_maps_have_the_input_shape_and_show_structure(tiny_run):
    _, run_dir = tiny_run
    model = Run(run_dir).model.best()
    images, _ = Run(run_dir).examples.arrays("test", limit=4)
    predicted = model.predict(images, verbose=0).argmax(1)
    view = explain.functional_view(model)
    for method in explain.METHODS:
        maps = explain.attribution_maps(view, images, predicted, method,
                                        explain.last_block_name(model), smooth_samples=4)
        assert maps.shape == (4, 32, 32), method
        assert np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
        assert np.all(maps.reshape(4, -1).std(1) > 1e-3), method  # not constant
    with pytest.raises(ValueError, match="unknown method"):
        explain.attribution_maps(view, images, predicted, "lime")


def test_explain_stage_writes_its_pictures(tiny_run):
    _, run_dir = tiny_run
    stage = run_dir / "explain"
    outputs = artifacts.read_json(stage / artifacts.MANIFEST)["outputs"]
    assert explain_stage.EXPLAIN_MD in outputs
    md = (stage / explain_stage.EXPLAIN_MD).read_text()
    for png in [o for o in outputs if o.endswith(".png")]:
        assert f"]({png})" in md
        with Image.open(stage / png) as image:
            width, height = image.size
        if png == explain_stage.REPRESENTATIONS_PNG:
            assert (width, height) == (576, 468)
        elif png == explain_stage.CURVES_PNG:  # three panels: the run watched rejection
            assert (width, height) == (int(13.5 * 90), 306)
        else:  # one row per image, the image and three maps
            assert width == int(1.9 * 4 * 90) and height % int(2.0 * 90) == 0
    assert {"maps_accepted.png", "representations.png", "training_curves.png"} <= set(outputs)
    assert "each class's mean z over these images as a star" in md
    assert ("Each map shows which pixels move the deployed score, the predicted class's summed "
            "standardised tied-Gaussian score on the encoder layers quad3, quad4, head") in md
    assert "[explain.md](explain/explain.md)" in (run_dir / "README.md").read_text()
