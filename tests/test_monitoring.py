"""sdim_tf.monitoring against an independent numpy computation of every figure."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import sdim_tf
from sdim_tf import density, monitoring
from tests.references import numpy_scores as _numpy_scores

CLASSES = 3


def _numpy_threshold(scores: np.ndarray, labels: np.ndarray, step_index: int) -> float:
    """Shared rule at percentile step_index / 20: of the correctly classified samples' scores
    sorted ascending, the one at index floor(p / 100 * n), capped at the last; +inf if none."""
    correct = scores.argmax(1) == labels
    values = np.sort(scores.max(1)[correct])
    if not len(values):
        return math.inf
    return float(values[min(step_index * len(values) // 2000, len(values) - 1)])


def _numpy_rejected(scores: np.ndarray, threshold: float) -> np.ndarray:
    return np.array([not row.max() >= threshold for row in scores])


def _numpy_budget(scores: np.ndarray, labels: np.ndarray, budget: float) -> tuple[float, float]:
    """(largest percentile in steps of 0.05 below 50 rejecting <= budget, its threshold);
    the search stops at the first percentile over budget."""
    best = 0
    for k in range(1000):
        if _numpy_rejected(scores, _numpy_threshold(scores, labels, k)).mean() > budget:
            break
        best = k
    return best / 20, _numpy_threshold(scores, labels, best)


def _numpy_conformal(scores: np.ndarray, budget: float, confidence: float) -> float:
    """Split conformal with confidence: the k-th smallest top score for the largest k with
    P(Binomial(n, budget) >= k) >= confidence, summed term by term; -inf if no k."""
    top, n = np.sort(scores.max(1)), len(scores)
    tail = [sum(math.comb(n, j) * budget ** j * (1 - budget) ** (n - j) for j in range(k, n + 1))
            for k in range(1, n + 1)]
    ks = [k for k in range(1, n + 1) if tail[k - 1] >= confidence]
    return float(top[max(ks) - 1]) if ks else -math.inf


def _pair_auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    wins = (inside[:, None] > outside[None]).sum() + 0.5 * (inside[:, None] == outside[None]).sum()
    return float(wins / (len(inside) * len(outside)))


def _images(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of overlapping brightness: features differ by class, not perfectly."""
    labels = np.arange(n) % CLASSES
    brightness = 0.5 + 0.12 * labels + rng.uniform(-0.12, 0.12, n)
    images = rng.uniform(0, 1, (n, 32, 32, 1)) * brightness[:, None, None, None]
    images = images.astype(np.float32)
    return images, labels


def _expected(scores: dict, labels, budget: float, outliers, rule: str) -> dict:
    held = scores["held_out"]
    if rule == "percentile":
        percentile, threshold = _numpy_budget(held, labels, budget)
    else:
        percentile, threshold = None, _numpy_conformal(held, budget, 0.95)
    top = {k: v.max(1) for k, v in scores.items()}
    expected = {"accuracy": float((held.argmax(1) == labels).mean()),
                **({} if percentile is None else {"percentile": percentile}),
                "threshold": threshold,
                "rejected": float(_numpy_rejected(held, threshold).mean()),
                "outlier_rejected": {k: float(_numpy_rejected(scores[k], threshold).mean())
                                     for k in outliers},
                "outlier_auroc": {k: _pair_auroc(top["held_out"], top[k]) for k in outliers}}
    expected["mean_outlier_auroc"] = float(np.mean(list(expected["outlier_auroc"].values())))
    expected["mean_outlier_rejected"] = float(np.mean(
        list(expected["outlier_rejected"].values())))
    return expected


def _assert_quality(got: dict, expected: dict, score_tolerance: float):
    assert ("percentile" in got) == ("percentile" in expected)
    for key in ("accuracy", "percentile", "rejected", "mean_outlier_rejected"):
        if key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    assert got["threshold"] == pytest.approx(expected["threshold"], rel=score_tolerance,
                                             abs=score_tolerance)
    assert got["mean_outlier_auroc"] == pytest.approx(expected["mean_outlier_auroc"], abs=1e-12)
    for key in ("outlier_rejected", "outlier_auroc"):
        assert got[key].keys() == expected[key].keys()
        for name, value in expected[key].items():
            assert got[key][name] == pytest.approx(value, abs=1e-12), (key, name)


@pytest.mark.parametrize("budget,rule", [(0.04, "percentile"), (0.3, "percentile"),
                                         (0.1, "conformal"), (0.3, "conformal")])
def test_every_figure_matches_numpy(budget, rule):
    keras.utils.set_random_seed(0)  # the same weights whatever ran before
    rng = np.random.default_rng(0)
    model = sdim_tf.SDIM(CLASSES, (32, 32, 1), rep_dim=8)
    fit, held_out = _images(rng, 60), _images(rng, 60)
    # Class conditionals at the classes' z, so that the paper's score classifies and its
    # percentile search has work to do (an untrained model predicts one class).
    z = model.encoder.features(fit[0], training=False)["z"].numpy()
    means = np.stack([z[fit[1] == c].mean(0) for c in range(CLASSES)])
    log_scales = np.log(np.stack([z[fit[1] == c].std(0) for c in range(CLASSES)]))
    model.class_conditional.embedding.assign(np.concatenate([means, log_scales], 1))
    outliers = {"noise": rng.uniform(0, 1, (40, 32, 32, 1)).astype(np.float32),
                "dark": (0.05 * rng.uniform(0, 1, (40, 32, 32, 1))).astype(np.float32)}
    layer_sets = (("head",), ("stage1", "z"), ("z", density.SPLIT))
    quality = monitoring.rejection_quality(model, fit, held_out, outliers, budget=budget,
                                           layers=layer_sets, batch_size=25, rule=rule)
    assert set(quality) == {"model", "density_head", "density_stage1_z",
                            "density_z_split", "seconds"}
    assert quality["seconds"] > 0

    features = {k: v.numpy() for k, v in model.encoder.features(fit[0], training=False).items()}
    image_sets = {"held_out": held_out[0], **outliers}
    encoded = {k: {name: v.numpy() for name, v in
                   model.encoder.features(images, training=False).items()}
               for k, images in image_sets.items()}
    # The paper's score is the model's own output, log p(x|c).
    model_scores = {k: model(images, training=False).numpy().astype(np.float64)
                    for k, images in image_sets.items()}
    _assert_quality(quality["model"],
                    _expected(model_scores, held_out[1], budget, outliers, rule),
                    1e-5)
    for layers in layer_sets:
        split = layers[-1] == density.SPLIT
        named = layers[:len(layers) - split]
        scores = {k: _numpy_scores({name: features[name] for name in named}, fit[1], v,
                                   CLASSES, 1e-6, split) for k, v in encoded.items()}
        _assert_quality(quality[monitoring.score_name(layers)],
                        _expected(scores, held_out[1], budget, outliers, rule), 1e-3)

    rows = monitoring.flat(quality)
    assert rows["model/accuracy"] == quality["model"]["accuracy"]
    assert rows["density_head/mean_outlier_auroc"] == quality["density_head"][
        "mean_outlier_auroc"]
    assert rows["density_stage1_z/outlier_auroc/noise"] == quality["density_stage1_z"][
        "outlier_auroc"]["noise"]
    assert all(isinstance(v, float) for v in rows.values())
    per_score = 6 if rule == "percentile" else 5
    assert len(rows) == 1 + 4 * (per_score + 2 * len(outliers))


def test_final_measure_is_reported_apart():
    """Test data gets its own figures at the held-out thresholds and stays out of the means."""
    rng = np.random.default_rng(1)
    model = sdim_tf.DiscriminativeClassifier(CLASSES)
    fit, held_out, test = _images(rng, 45), _images(rng, 45), _images(rng, 30)
    outliers = {"noise": rng.uniform(0, 1, (20, 32, 32, 1)).astype(np.float32)}
    test_outliers = {"ood": rng.uniform(0.5, 1, (20, 32, 32, 1)).astype(np.float32)}
    plain = monitoring.rejection_quality(model, fit, held_out, outliers, budget=0.3)
    quality = monitoring.rejection_quality(model, fit, held_out, outliers, budget=0.3,
                                           test=test, test_outliers=test_outliers)
    for name in ("model", monitoring.score_name(monitoring.layer_set())):
        kept = {k: v for k, v in quality[name].items() if k != "final_measure"}
        assert kept == plain[name]
    logits = model(test[0], training=False).numpy()
    ood = model(test_outliers["ood"], training=False).numpy()
    final = quality["model"]["final_measure"]
    threshold = quality["model"]["threshold"]
    assert final["accuracy"] == pytest.approx((logits.argmax(1) == test[1]).mean())
    assert final["rejected"] == pytest.approx(_numpy_rejected(logits, threshold).mean())
    assert final["outlier_rejected"]["ood"] == pytest.approx(
        _numpy_rejected(ood, threshold).mean())
    assert final["outlier_auroc"]["ood"] == pytest.approx(
        _pair_auroc(logits.max(1), ood.max(1)), abs=1e-12)
