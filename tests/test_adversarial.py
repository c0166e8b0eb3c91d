"""Attacks against hand-made models whose gradients and answers are known in closed form."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from sdim_tf import adversarial

H = 8
_RNG = np.random.default_rng(0)
PROTOS = _RNG.uniform(0, 1, (3, H, H, 1)).astype(np.float32)
WEIGHTS = ((PROTOS - 0.5).reshape(3, -1).T * 4).astype(np.float32)  # [64, 3]


@tf.autograph.experimental.do_not_convert
def linear_model(images, training=False):
    return tf.reshape(images, [-1, H * H]) @ WEIGHTS


def numpy_logits(images):
    return images.reshape(len(images), -1).astype(np.float64) @ WEIGHTS


@pytest.fixture(scope="module")
def classifier():
    return adversarial.art_classifier(linear_model, 3, (H, H, 1), batch_size=4)


@pytest.fixture(scope="module")
def near_boundary():
    """Blends of two prototypes: close to a decision boundary, labelled by the model."""
    images = np.clip(0.6 * PROTOS[[0, 1, 2, 0, 1, 2]] + 0.4 * PROTOS[[1, 2, 0, 2, 0, 1]], 0, 1)
    images = images.astype(np.float32)
    return images, numpy_logits(images).argmax(1)


def test_predictions_and_gradients_match_closed_form(classifier, near_boundary):
    images, labels = near_boundary
    np.testing.assert_allclose(classifier.predict(images), numpy_logits(images), rtol=1e-5)
    jacobian = classifier.class_gradient(images)  # d logit_c / d x = W[:, c]
    assert jacobian.shape == (6, 3, H, H, 1)
    for c in range(3):
        np.testing.assert_allclose(jacobian[:, c].reshape(6, -1),
                                   np.broadcast_to(WEIGHTS[:, c], (6, H * H)), rtol=1e-6)
    picked = classifier.class_gradient(images, label=[2, 0, 1, 1, 0, 2])
    np.testing.assert_allclose(picked[:, 0].reshape(6, -1), WEIGHTS[:, [2, 0, 1, 1, 0, 2]].T,
                               rtol=1e-6)
    # cross-entropy: d/dx = W (softmax - onehot); ART's own eager code agrees
    onehot = np.eye(3, dtype=np.float32)[labels]
    expected = (special.softmax(numpy_logits(images), 1) - onehot) @ WEIGHTS.T
    ours = classifier.loss_gradient(images, onehot)
    np.testing.assert_allclose(ours.reshape(6, -1), expected, rtol=1e-4, atol=1e-5)
    base = type(classifier).__mro__[1]
    np.testing.assert_allclose(base.class_gradient(classifier, images), jacobian, rtol=1e-5)
    tensor = classifier.loss_gradient(tf.constant(images), onehot)  # ART's TF PGD path
    np.testing.assert_allclose(tensor.numpy(), ours, rtol=1e-5, atol=1e-7)


def test_fgsm_curve_matches_numpy_fgsm(classifier, near_boundary):
    images, labels = near_boundary
    settings = adversarial.AttackSettings(epsilons=(0.0, 0.05, 0.2), batch_size=4)
    curve = adversarial.accuracy_curve(classifier, images, labels, "fgsm", settings)
    onehot = np.eye(3)[labels]
    grad = (special.softmax(numpy_logits(images), 1) - onehot) @ WEIGHTS.T
    expected = []
    for eps in settings.epsilons:
        moved = np.clip(images.reshape(6, -1) + eps * np.sign(grad), 0, 1)
        expected.append(float((numpy_logits(moved).argmax(1) == labels).mean()))
    assert curve == expected
    assert curve[0] == 1.0 and curve[-1] < 1.0


def test_pgd_curve_is_at_most_fgsm_and_starts_clean(classifier, near_boundary):
    images, labels = near_boundary
    settings = adversarial.AttackSettings(epsilons=(0.0, 0.2), pgd_steps=5, batch_size=4)
    pgd = adversarial.accuracy_curve(classifier, images, labels, "pgd", settings)
    fgsm = adversarial.accuracy_curve(classifier, images, labels, "fgsm", settings)
    assert pgd[0] == 1.0 and pgd[1] <= fgsm[1]
    with pytest.raises(ValueError, match="deepfool"):
        adversarial.accuracy_curve(classifier, images, labels, "deepfool", settings)


@pytest.mark.parametrize("attack", ["deepfool", "boundary", "local_search", "cw_l2"])
def test_attack_changes_predictions_where_it_succeeds(classifier, near_boundary, attack):
    images, labels = near_boundary
    settings = adversarial.AttackSettings(deepfool_steps=20, boundary_steps=20,
                                          local_search_rounds=50, cw_steps=10,
                                          cw_search_steps=5, batch_size=4)
    if attack == "cw_l2":
        targets = (labels + 1) % 3
        result = adversarial.carlini_l2(classifier, images, targets, 0.0, settings)
        exact = numpy_logits(result.adversarial)
        np.testing.assert_array_equal(
            result.success, adversarial.targeted_success(result.logits, targets, 0.0))
        reached, gap = exact.argmax(1) == targets, _gap(exact, targets)
    else:
        fn = {"deepfool": adversarial.deepfool, "boundary": adversarial.boundary,
              "local_search": adversarial.local_search_attack}[attack]
        result = fn(classifier, images, labels, settings)
        exact = numpy_logits(result.adversarial)
        # success is decided by the forward pass whose logits the report holds
        np.testing.assert_array_equal(result.success, result.logits.argmax(1) != labels)
        reached, gap = exact.argmax(1) != labels, _gap(exact, labels)
    assert result.success.sum() >= 2
    # float64 agrees wherever the decision is not a near-tie (float32 rounding decides those)
    clear = np.abs(gap) > 1e-3
    assert clear.sum() >= 4
    np.testing.assert_array_equal(result.success[clear], reached[clear])
    assert np.all(result.adversarial >= 0) and np.all(result.adversarial <= 1)
    np.testing.assert_allclose(result.logits, numpy_logits(result.adversarial), rtol=1e-4,
                               atol=1e-4)
    distance = result.l2(images)
    assert np.all(distance[result.success] > 0)
    if attack in ("local_search", "cw_l2"):  # failures come back unchanged
        assert np.all(distance[~result.success] == 0)


def _gap(logits, classes):
    """logit of `classes` minus the best other logit (0 at a tie)."""
    rows = np.arange(len(logits))
    others = logits.copy()
    others[rows, classes] = -np.inf
    return logits[rows, classes] - others.max(1)


def _pixel_model(i, j):
    """Class 1 wins when pixel (i, j) lies more than 0.4 from mid-grey; others do nothing."""
    def predict(images):
        u = np.abs(images[:, i, j, 0].astype(np.float64) - 0.5)
        return np.stack([np.zeros_like(u), 20 * (u - 0.4)], 1)
    return predict


@pytest.mark.parametrize("value, rounds_needed, expected", [
    (0.8, 1, 0.95),   # u = 0.3 -> 0.45
    (0.7, 2, 0.95),   # u = 0.2 -> 0.3 -> 0.45
    (0.86, 1, 0.04),  # u = 0.36 -> 0.54, wraps to -0.46
    (0.2, 1, 0.05),   # u = -0.3 -> -0.45
])
def test_local_search_finds_the_one_pixel_that_matters(value, rounds_needed, expected):
    images = np.full((1, 6, 6, 1), 0.5, np.float32)
    images[0, 4, 1, 0] = value
    predict = _pixel_model(4, 1)
    for rounds in range(1, rounds_needed + 1):
        adv, success = adversarial.local_search(predict, images, np.array([0]), rounds=rounds,
                                                initial_fraction=1.0, t=3, d=1)
        assert success[0] == (rounds == rounds_needed)
    changed = np.argwhere(np.abs(adv - images) > 1e-6)
    np.testing.assert_array_equal(changed, [[0, 4, 1, 0]])
    assert adv[0, 4, 1, 0] == pytest.approx(expected, abs=1e-6)


def test_local_search_gives_up_and_returns_the_original():
    images = np.random.default_rng(1).uniform(0, 1, (2, 5, 5, 1)).astype(np.float32)

    def constant(batch):
        return np.tile([[3.0, 1.0, 0.0]], (len(batch), 1))

    adv, success = adversarial.local_search(constant, images, np.array([0, 0]), rounds=4)
    assert not success.any()
    np.testing.assert_array_equal(adv, images)
    # with k=2 the true class must leave the top two: class 1 leads only in the top one
    adv, success = adversarial.local_search(lambda b: constant(b)[:, ::-1], images,
                                            np.array([1, 0]), rounds=2, k=2)
    assert success.tolist() == [False, True]


def test_targeted_success_needs_the_confidence_margin():
    logits = np.array([[5.0, 4.0, 0.0], [1.0, 9.0, 8.5], [2.0, 2.0, 0.0], [0.0, 10.0, 0.0]])
    targets = np.array([0, 1, 1, 1])
    assert adversarial.targeted_success(logits, targets, 0).tolist() == [True, True, False,
                                                                        True]
    assert adversarial.targeted_success(logits, targets, 1).tolist() == [True, False, False,
                                                                        True]
    assert adversarial.untargeted_success(logits, [1, 1, 1, 0]).tolist() == [True, False, True,
                                                                           True]


def test_detection_rates_count_rejected_successes_only():
    # predicted classes 0, 1, 1, 0, 2; success on the first four
    logits = np.array([[5.0, 1, 0], [0, 2.0, 1], [0, 9.0, 1], [-3.0, -4, -5], [0, 0, 7.0]])
    success = np.array([True, True, True, True, False])
    thresholds = {1: np.array([4.0, 3.0, 0.0]), 2: np.array([-10.0, 10.0, 100.0])}
    rates = adversarial.detection_rates(logits, success, thresholds)
    # p=1: 5>=4 kept, 2<3 rejected, 9>=3 kept, -3<4 rejected -> 2/4
    # p=2: kept, rejected, rejected, kept -> 2/4; the unsuccessful row never counts
    assert rates == {1: 0.5, 2: 0.5}
    rates = adversarial.detection_rates(logits, np.array([False, True, False, False, False]),
                                        thresholds)
    assert rates == {1: 1.0, 2: 1.0}
    assert adversarial.detection_rates(logits, np.zeros(5, bool), thresholds) == {1: None,
                                                                                  2: None}


def test_first_correct_takes_the_first_correct_indices():
    logits = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 0], [0, 1.0]])
    labels = np.array([0, 0, 0, 1, 1])
    assert adversarial.first_correct(logits, labels, 2).tolist() == [0, 2]
    assert adversarial.first_correct(logits, labels, 10).tolist() == [0, 2, 4]
