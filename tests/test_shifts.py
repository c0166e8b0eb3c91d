"""Shift suite, outliers from in-distribution images and selective metrics against references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sdim_tf import data, metrics, outlier_proxies, shifts

RANDOM = ("gaussian_noise", "shot_noise", "salt_and_pepper", "rotate", "occlusion")


@pytest.fixture(scope="module")
def fashion(data_dir):
    """64 real Fashion-MNIST test images, preprocessed to float32 [64, 32, 32, 1], and labels."""
    images, labels = data.load_split("fashion_mnist", "test", str(data_dir))
    return np.asarray(data.preprocess(images[:64])), labels[:64]


def _parameter(name, severity):
    return shifts.PARAMETERS[name][severity - 1]


# ------------------------------------------------------------------------------ shift suite

def test_api_lists_corruptions_severities_and_parameters():
    assert shifts.SEVERITIES == (1, 2, 3, 4, 5) and shifts.MIDDLE_SEVERITY == 3
    assert shifts.CORRUPTIONS == tuple(shifts.PARAMETERS) and len(shifts.CORRUPTIONS) >= 8
    assert all(len(p) == 5 for p in shifts.PARAMETERS.values())
    assert set(shifts.STREAMS) == set(RANDOM)
    assert len(set(shifts.STREAMS.values())) == len(shifts.STREAMS)


def test_unknown_name_or_severity_is_a_value_error_naming_the_valid_ones():
    images = np.zeros((1, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="gaussian_noise.*occlusion"):
        shifts.corrupt(images, "fog", 1)
    for severity in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 5\)"):
            shifts.corrupt(images, "brightness", severity)


@pytest.mark.parametrize("name", shifts.CORRUPTIONS)
def test_shape_dtype_range_and_determinism(fashion, name):
    images = fashion[0][:16]
    before = images.copy()
    out = shifts.corrupt(images, name, 5, seed=7)
    np.testing.assert_array_equal(images, before)  # input untouched
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, shifts.corrupt(images, name, 5, seed=7))
    other = shifts.corrupt(images, name, 5, seed=8)
    if name in RANDOM:
        assert not np.array_equal(out, other)
    else:
        np.testing.assert_array_equal(out, other)


def test_severity_increases_the_change_on_real_images(fashion):
    images = fashion[0]
    for name in shifts.CORRUPTIONS:
        change = [np.abs(shifts.corrupt(images, name, s) - images).mean()
                  for s in shifts.SEVERITIES]
        assert change[0] > 0 and np.all(np.diff(change) > 0), (name, change)


def test_gaussian_noise_against_reference():
    images = np.random.default_rng(0).random((3, 8, 8, 2)).astype(np.float32)
    for severity in shifts.SEVERITIES:
        sigma = _parameter("gaussian_noise", severity)
        rng = np.random.default_rng(5 + shifts.STREAMS["gaussian_noise"])
        expected = np.clip(images + sigma * rng.standard_normal(images.shape), 0, 1)
        np.testing.assert_allclose(shifts.corrupt(images, "gaussian_noise", severity, seed=5),
                                   expected, atol=1e-6)
    grey = np.full((4, 32, 32, 1), 0.5, np.float32)  # no clipping: the spread is sigma
    noisy = shifts.corrupt(grey, "gaussian_noise", 3)
    assert abs((noisy - grey).std() - _parameter("gaussian_noise", 3)) < 0.01


def test_shot_noise_keeps_black_and_has_poisson_spread():
    grey = np.full((8, 32, 32, 1), 0.25, np.float32)
    grey[:, :4] = 0.0
    photons = _parameter("shot_noise", 2)
    out = shifts.corrupt(grey, "shot_noise", 2)
    assert np.all(out[:, :4] == 0.0)
    lit = out[:, 4:]
    assert abs(lit.mean() - 0.25) < 0.01
    assert abs(lit.var() - 0.25 / photons) < 0.1 * 0.25 / photons
    np.testing.assert_allclose(lit * photons, np.round(lit * photons), atol=1e-4)


def test_salt_and_pepper_against_reference():
    images = np.random.default_rng(1).random((4, 16, 16, 3)).astype(np.float32)
    amount = _parameter("salt_and_pepper", 4)
    out = shifts.corrupt(images, "salt_and_pepper", 4, seed=2)
    rng = np.random.default_rng(2 + shifts.STREAMS["salt_and_pepper"])
    hit, salt = rng.random((4, 16, 16)), rng.random((4, 16, 16))
    for n, i, j in np.ndindex(4, 16, 16):
        if hit[n, i, j] < amount:
            assert np.all(out[n, i, j] == (1.0 if salt[n, i, j] < 0.5 else 0.0))
        else:
            np.testing.assert_array_equal(out[n, i, j], images[n, i, j])
    big = shifts.corrupt(np.full((8, 32, 32, 1), 0.5, np.float32), "salt_and_pepper", 4)
    assert abs((big != 0.5).mean() - amount) < 0.02


def test_gaussian_blur_against_separable_numpy_kernel():
    images = np.random.default_rng(2).random((2, 12, 12, 1)).astype(np.float32)
    sigma = _parameter("gaussian_blur", 3)
    radius = int(4 * sigma + 0.5)  # scipy's default truncation at 4 sigma
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    # scipy's "reflect" repeats the edge value, numpy's "symmetric".
    padded = np.pad(images.astype(np.float64), ((0, 0), (radius, radius), (radius, radius),
                                                (0, 0)), mode="symmetric")
    rows = sum(k * padded[:, i:i + 12] for i, k in enumerate(kernel))
    expected = sum(k * rows[:, :, j:j + 12] for j, k in enumerate(kernel))
    np.testing.assert_allclose(shifts.corrupt(images, "gaussian_blur", 3), expected, atol=1e-5)
    flat = np.full((1, 12, 12, 1), 0.3, np.float32)
    np.testing.assert_allclose(shifts.corrupt(flat, "gaussian_blur", 5), flat, atol=1e-6)


def test_brightness_adds_and_clips():
    images = np.array([0.0, 0.3, 0.7, 0.95, 1.0], np.float32).reshape(1, 1, 5, 1)
    for severity in shifts.SEVERITIES:
        delta = _parameter("brightness", severity)
        expected = [min(v + delta, 1.0) for v in (0.0, 0.3, 0.7, 0.95, 1.0)]
        np.testing.assert_allclose(shifts.corrupt(images, "brightness", severity).ravel(),
                                   expected, atol=1e-6)


def test_contrast_scales_around_each_image_mean(fashion):
    images = fashion[0][:4]
    for severity in shifts.SEVERITIES:
        factor = _parameter("contrast", severity)
        out = shifts.corrupt(images, "contrast", severity)
        for image, result in zip(images, out, strict=True):
            mean = image.astype(np.float64).mean()
            np.testing.assert_allclose(result, (image - mean) * factor + mean, atol=1e-6)
            assert abs(result.mean() - mean) < 1e-5
            assert abs(result.std() - factor * image.std()) < 1e-5


def test_translate_moves_pixels_right_and_fills_zeros():
    images = np.random.default_rng(3).random((2, 6, 9, 2)).astype(np.float32) + 0.01
    images = np.minimum(images, 1.0)
    for severity in shifts.SEVERITIES:
        k = _parameter("translate", severity)
        out = shifts.corrupt(images, "translate", severity)
        for n, i, j in np.ndindex(2, 6, 9):
            if j + k < 9:
                np.testing.assert_array_equal(out[n, i, j + k], images[n, i, j])
            if j < k:
                assert np.all(out[n, i, j] == 0.0)


def test_rotate_turns_each_image_one_way_or_the_other(fashion):
    images = fashion[0][:8]
    degrees = _parameter("rotate", 2)
    out = shifts.corrupt(images, "rotate", 2, seed=3)
    turned = {sign: np.clip(ndimage.rotate(images, sign * degrees, axes=(1, 2), reshape=False,
                                           order=1, mode="constant"), 0, 1)
              for sign in (-1, 1)}
    signs = []
    for n in range(8):
        matches = [s for s in (-1, 1) if np.allclose(out[n], turned[s][n], atol=1e-6)]
        assert len(matches) == 1
        signs.append(matches[0])
    assert len(set(signs)) == 2  # both directions occur among 8 images
    y, x = np.mgrid[:32, :32] - 15.5
    blob = np.exp(-(x ** 2 + y ** 2) / 40.0)[None, :, :, None].astype(np.float32)
    assert np.abs(shifts.corrupt(blob, "rotate", 5) - blob).max() < 0.02  # symmetric: unchanged


def test_jpeg_keeps_flat_images_and_stays_on_the_uint8_grid(fashion):
    flat = np.full((2, 32, 32, 1), 128 / 255, np.float32)
    np.testing.assert_allclose(shifts.corrupt(flat, "jpeg", 5), flat, atol=1.5 / 255)
    out = shifts.corrupt(fashion[0][:4], "jpeg", 3)
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-3)


def test_pixelate_against_block_loop():
    images = np.random.default_rng(4).random((2, 10, 10, 2)).astype(np.float32)
    for severity in shifts.SEVERITIES:
        b = _parameter("pixelate", severity)
        expected = np.empty_like(images)
        for top in range(0, 10, b):
            for left in range(0, 10, b):
                cell = images[:, top:top + b, left:left + b]
                expected[:, top:top + b, left:left + b] = cell.mean(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(shifts.corrupt(images, "pixelate", severity), expected,
                                   atol=1e-6)


def test_occlusion_zeroes_one_square_at_the_seeded_place():
    images = np.random.default_rng(5).random((6, 32, 32, 1)).astype(np.float32) * 0.9 + 0.1
    for severity in shifts.SEVERITIES:
        side = _parameter("occlusion", severity)
        out = shifts.corrupt(images, "occlusion", severity, seed=9)
        rng = np.random.default_rng(9 + shifts.STREAMS["occlusion"])
        centres = rng.integers(0, (32, 32), size=(6, 2))
        for n in range(6):
            top = min(max(centres[n, 0] - side // 2, 0), 32 - side)
            left = min(max(centres[n, 1] - side // 2, 0), 32 - side)
            inside = np.zeros((32, 32), bool)
            inside[top:top + side, left:left + side] = True
            assert inside.sum() == side * side
            assert np.all(out[n][inside] == 0.0)
            np.testing.assert_array_equal(out[n][~inside], images[n][~inside])


# ---------------------------------------------------------------------------------- outliers

def _old_proxy_outliers(images, seed=0):
    """The formula of bench/posthoc_scores.py before the move, kept as the reference."""
    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    permutation = rng.permutation(h * w)
    tile = h // 4
    grid = images.reshape(n, 4, tile, 4, tile, c).transpose(0, 1, 3, 2, 4, 5)
    grid = grid.reshape(n, 16, tile, tile, c)[:, rng.permutation(16)]
    shuffled = grid.reshape(n, 4, 4, tile, tile, c).transpose(0, 1, 3, 2, 4, 5)
    return {"flipped": images[:, ::-1], "inverted": 1.0 - images,
            "pixel_permuted": images.reshape(n, h * w, c)[:, permutation].reshape(images.shape),
            "tile_shuffled": shuffled.reshape(images.shape)}


@pytest.mark.parametrize("seed, channels", [(0, 1), (3, 3)])
def test_proxy_outliers_match_the_old_formula(seed, channels):
    images = np.random.default_rng(6).random((5, 32, 32, channels)).astype(np.float32)
    got, expected = outlier_proxies.proxy_outliers(images, seed), _old_proxy_outliers(images, seed)
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(got[name], expected[name])


def test_part_partners_have_pairwise_different_labels(fashion):
    labels = fashion[1]
    partners = outlier_proxies.part_partners(labels, seed=1)
    assert partners.shape == (64, 4)
    np.testing.assert_array_equal(partners[:, 0], np.arange(64))
    for row in labels[partners]:
        assert len(set(row.tolist())) == 4
    np.testing.assert_array_equal(partners, outlier_proxies.part_partners(labels, seed=1))
    assert not np.array_equal(partners, outlier_proxies.part_partners(labels, seed=2))
    with pytest.raises(ValueError, match="4 classes"):
        outlier_proxies.part_partners(np.array([0, 1, 2, 0, 1, 2]))


def test_part_outliers_shapes_ranges_on_real_images(fashion):
    images, labels = fashion
    result = outlier_proxies.part_outliers(images, labels, seed=0)
    assert tuple(result) == outlier_proxies.PART_OUTLIERS
    for value in result.values():
        assert value.shape == images.shape and value.dtype == np.float32
        assert value.min() >= 0.0 and value.max() <= 1.0
    again = outlier_proxies.part_outliers(images, labels, seed=0)
    for name in result:
        np.testing.assert_array_equal(result[name], again[name])
    # every set of both kinds; the parts only where four classes are present
    both = outlier_proxies.built_outliers(images, labels, seed=0)
    proxies = outlier_proxies.proxy_outliers(images, 0)
    assert list(both) == [*proxies, *outlier_proxies.PART_OUTLIERS]
    for name, value in {**proxies, **result}.items():
        np.testing.assert_array_equal(both[name], value)
    three = np.isin(labels, np.unique(labels)[:3])
    assert list(outlier_proxies.built_outliers(images[three], labels[three])) == list(proxies)


def test_part_outliers_by_hand_on_tiny_images():
    # Four 4x4 images of four classes; image i holds 10 * i + (pixel number) / 100.
    images = (np.arange(4)[:, None] * 10 + np.arange(16)[None] / 100).reshape(4, 4, 4, 1) / 40
    labels = np.array([3, 1, 0, 2])
    partners = outlier_proxies.part_partners(labels, seed=4)
    result = outlier_proxies.part_outliers(images, labels, seed=4)
    for i in range(4):
        a, b, c, d = (images[p] for p in partners[i])
        assert sorted(partners[i].tolist()) == [0, 1, 2, 3]
        halves = np.concatenate([a[:2], b[2:]])
        np.testing.assert_allclose(result["halves"][i], halves, atol=1e-6)
        top = np.concatenate([a[:2, :2], b[:2, 2:]], axis=1)
        bottom = np.concatenate([c[2:, :2], d[2:, 2:]], axis=1)
        quadrants = np.concatenate([top, bottom])
        np.testing.assert_allclose(result["quadrants"][i], quadrants, atol=1e-6)
        np.testing.assert_allclose(result["blend"][i], (a + b) / 2, atol=1e-6)
        np.testing.assert_allclose(result["overlay"][i], np.maximum(a, b), atol=1e-6)


# ---------------------------------------------------------------------------------- metrics

def test_silent_error_is_a_share_of_all_samples():
    predicted = [0, 1, 2, 3, 4]
    labels = [0, 1, 0, 0, 4]
    # 2 wrong and rejected, 3 wrong and accepted, 4 right and rejected: 1 silent error of 5.
    assert metrics.silent_error(predicted, labels, [False, False, True, False, True]) == 0.2
    assert metrics.silent_error(predicted, labels, [True] * 5) == 0.0
    assert metrics.silent_error(predicted, labels, [False] * 5) == 0.4
    with pytest.raises(ValueError):
        metrics.silent_error([0, 1], [0], [False, False])


def test_risk_coverage_without_ties():
    # Sorted: 0.9 right, 0.8 wrong, 0.7 right, 0.6 wrong.
    result = metrics.risk_coverage([0.6, 0.9, 0.7, 0.8], [False, True, True, False])
    np.testing.assert_allclose(result["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(result["risk"], [0.0, 1 / 2, 1 / 3, 1 / 2])
    assert result["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)  # = 1/3


def test_risk_coverage_groups_ties():
    # Groups {3}, {2, 2}, {1, 1, 1}: the curve is evaluated at k = 1, 3 and 6 only.
    scores = [3, 2, 2, 1, 1, 1]
    correct = [True, True, False, False, True, True]
    result = metrics.risk_coverage(scores, correct)
    np.testing.assert_allclose(result["coverage"], [1 / 6, 3 / 6, 1.0])
    np.testing.assert_allclose(result["risk"], [0.0, 1 / 3, 2 / 6])
    # 1/6 * 0 + 2/6 * 1/3 + 3/6 * 1/3 = 5/18
    assert result["aurc"] == pytest.approx(5 / 18)
    # The order inside a tie group does not matter.
    swapped = metrics.risk_coverage([3, 2, 2, 1, 1, 1], [True, False, True, True, True, False])
    np.testing.assert_allclose(swapped["risk"], result["risk"])
    assert swapped["aurc"] == pytest.approx(5 / 18)


class _BrightnessClassifier:
    """Class 1 when the mean pixel exceeds 0.5, else class 0; the score is the distance
    from 0.5, rejected below 0.08: a rule whose every figure is easy to count by hand."""

    def class_scores(self, batches):
        scores, labels = [], []
        for images, batch_labels in batches:
            m = np.asarray(images).mean(axis=(1, 2, 3)).astype(np.float64)
            scores.append(np.stack([0.5 - m, m - 0.5], 1))
            labels.append(np.asarray(batch_labels))
        return np.concatenate(scores), np.concatenate(labels)

    def __init__(self, min_gap=None):
        self.min_gap = min_gap

    def decide(self, scores):
        from sdim_tf import rejection

        return rejection.decide(scores, [0.08, 0.08], min_gap=self.min_gap)


def test_measure_counts_accuracy_rejection_and_silent_errors_by_hand():
    # means 0.1, 0.45, 0.55, 0.9 with labels 0, 1, 1, 1:
    # predicted 0, 0, 1, 1; scores 0.4, 0.05, 0.05, 0.4 -> rejected F, T, T, F
    means = np.array([0.1, 0.45, 0.55, 0.9], np.float32)
    images = np.broadcast_to(means[:, None, None, None], (4, 32, 32, 1)).copy()
    labels = np.array([0, 1, 1, 1])
    result = shifts.measure(_BrightnessClassifier(), images, labels, severities=(3,))
    assert result["clean"] == {"accuracy": 0.75, "rejected": 0.5, "silent_error": 0.0,
                               "unfamiliar": 0.5, "ambiguous": 0.0}
    # brightness +0.3 (severity 3): means 0.4, 0.75, 0.85, 1.0 -> predicted 0, 1, 1, 1,
    # scores 0.1, 0.25, 0.35, 0.5: none rejected, all right
    assert result["corruptions"]["brightness"]["3"] == {"accuracy": 1.0, "rejected": 0.0,
                                                        "silent_error": 0.0,
                                                        "unfamiliar": 0.0, "ambiguous": 0.0}
    # with min_gap 0.85 the gaps (twice the scores) 0.2, 0.5, 0.7 are ambiguous, 1.0 is not
    gapped = shifts.measure(_BrightnessClassifier(min_gap=0.85), images, labels,
                            severities=(3,))
    assert gapped["corruptions"]["brightness"]["3"] == {"accuracy": 1.0, "rejected": 0.75,
                                                        "silent_error": 0.0,
                                                        "unfamiliar": 0.0, "ambiguous": 0.75}
    # contrast leaves a flat image as it is
    assert result["corruptions"]["contrast"]["3"] == result["clean"]
    # clean: by score 0.4 (right), 0.4 (right), then 0.05 (wrong), 0.05 (right), tied pairs:
    # risk 0 at coverage 1/2, 1/4 at 1 -> area 1/2 * 0 + 1/2 * 1/4
    assert result["aurc"]["clean"] == pytest.approx(0.125)
    silent = [v["3"]["silent_error"] for v in result["corruptions"].values()]
    assert result["mean_silent_error_middle"] == pytest.approx(np.mean(silent))


class _NoForwardPass(_BrightnessClassifier):
    def class_scores(self, batches):
        raise AssertionError("a kept part was computed again")


def test_measure_takes_kept_parts_instead_of_computing_them():
    """The evaluate stage resumes from the parts a killed run kept: given them, measure
    runs no forward pass and gives the same figures."""
    images = np.broadcast_to(np.array([0.1, 0.45, 0.55, 0.9], np.float32)[:, None, None, None],
                             (4, 32, 32, 1)).copy()
    labels = np.array([0, 1, 1, 1])
    kept, reported = {}, []

    def keep_computed(part, compute):
        kept[part] = compute()
        return kept[part]

    def progress(done, total):  # after each part, when it is kept
        reported.append((done, total, len(kept)))

    first = shifts.measure(_BrightnessClassifier(), images, labels, severities=(2, 3),
                           keep=keep_computed, progress=progress)
    assert sorted(kept) == sorted(["clean", *shifts.CORRUPTIONS])
    assert reported == [(i, 12, i) for i in range(1, 13)]
    assert all(sorted(kept[name]) == ["2", "3"] for name in shifts.CORRUPTIONS)
    again = shifts.measure(_NoForwardPass(), images, labels, severities=(2, 3),
                           keep=lambda part, compute: kept[part])
    assert again == first
    assert first == shifts.measure(_BrightnessClassifier(), images, labels, severities=(2, 3))
