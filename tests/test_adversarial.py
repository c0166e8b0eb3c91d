"""Attacks against hand-made models whose gradients and answers are known in closed form."""

import functools

import numpy as np
import pytest
import tensorflow as tf
from scipy import optimize, special

from sdim_tf import adversarial
from sdim_tf.adversarial import apgd, pgd

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


def test_local_search_reports_each_round_and_the_images_left():
    images = np.full((3, 6, 6, 1), 0.5, np.float32)
    images[0, 4, 1, 0] = 0.8  # fooled in round 1
    images[1, 4, 1, 0] = 0.7  # fooled in round 2
    # image 2: the pixel sits at 0.5, so p * sign(0) leaves it there: never fooled
    calls = []
    _, success = adversarial.local_search(_pixel_model(4, 1), images, np.array([0, 0, 0]),
                                          rounds=4, initial_fraction=1.0, t=3, d=1,
                                          progress=lambda *a: calls.append(a))
    assert success.tolist() == [True, True, False]
    assert calls == [(1, 2), (2, 1), (3, 1), (4, 1)]


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


# Adaptive attacks: success means wrong (or the target) and accepted by equation 9.

def _blend(a, i, j):
    return np.clip(a * PROTOS[i] + (1 - a) * PROTOS[j], 0, 1).astype(np.float32)


def test_undetected_success_is_the_deployed_rule():
    thresholds = np.array([1.0, 2.0, 3.0])
    scores = np.array([[0.0, 5.0, 1.0],   # class 1, accepted, wrong
                       [0.0, 1.5, 1.0],   # class 1, wrong but rejected (1.5 < 2)
                       [4.0, 0.0, 0.0],   # correct and accepted
                       [0.0, 0.0, 3.0],   # class 2 exactly at its threshold: accepted
                       [0.0, 0.0, 2.999],  # just below: rejected
                       [2.0, 2.0, 0.0]])  # tie: argmax takes class 0, the label
    labels = np.array([0, 0, 0, 1, 1, 0])
    assert adversarial.undetected_success(scores, labels, thresholds).tolist() == [
        True, False, False, True, False, False]


def test_margin_loss_picks_the_wrong_class_closest_to_acceptance():
    thresholds = np.array([3.0, 2.0, 2.0])
    scores = np.array([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [1.0, 4.0, 3.5], [0.0, 3.0, 1.0],
                       [5.0, 4.0, 3.0]], np.float32)
    labels, targets = np.array([0, 0, 1, 0, 0]), np.array([-1, 2, -1, 1, -1])
    # row 0: class 1 is closest (min(1-2, 1-5) = -4 against -5): (2-1) + (5-1) = 5
    # row 1: target 2: (2-0) + (5-0) = 7
    # row 2: class 0 min(1-3, 1-4) = -3, class 2 min(3.5-2, 3.5-4) = -0.5: 0 + 0.5
    # row 3: target 1 is accepted and leads: 0
    # row 4 (threshold of class 1 raised to 10): class 1 min(4-10, 4-5) = -6 loses to the
    # lower-scored class 2 min(3-2, 3-5) = -2: 0 + (5-3) = 2
    loss = adversarial.margin_loss(scores, labels, targets, thresholds)
    np.testing.assert_allclose(loss.numpy()[:4], [5.0, 7.0, 0.5, 0.0])
    loss = adversarial.margin_loss(scores, labels, targets, [0.0, 10.0, 2.0])
    np.testing.assert_allclose(loss.numpy()[4], 2.0)
    # margin 2 adds 2 inside each hinge: row 2 relu(2 - 1.5) + relu(2 + 0.5) = 3; row 3 1 + 0
    loss = adversarial.margin_loss(scores, labels, targets, thresholds, margin=2.0)
    np.testing.assert_allclose(loss.numpy()[:4], [9.0, 11.0, 3.0, 1.0])
    # margin inf drops the hinges: row 2 (2 - 3.5) + (4 - 3.5) = -1; row 3 (2 - 3) + (1 - 3)
    scores = tf.constant(scores)
    with tf.GradientTape() as tape:
        tape.watch(scores)
        loss = adversarial.margin_loss(scores, labels, targets, thresholds, margin=np.inf)
    np.testing.assert_allclose(loss.numpy()[:4], [5.0, 7.0, -1.0, -3.0])
    # d/ds of row 3 (towards class 1, rival class 2): -2 on class 1, +1 on class 2
    np.testing.assert_allclose(tape.gradient(loss, scores).numpy()[3], [0.0, -2.0, 1.0])


@tf.autograph.experimental.do_not_convert
def _two_class_model(images):
    return tf.reshape(images, [-1, H * H]) @ WEIGHTS[:, :2]


def test_step_sizes_by_hand():
    # constant: 2.5 * 0.1 / 4 at each of the 5 evaluations; cosine: 0.1 * (1 + cos(pi k / 4)) / 2
    np.testing.assert_allclose(adversarial.step_sizes(0.1, 4, "constant"), [0.0625] * 5)
    np.testing.assert_allclose(adversarial.step_sizes(0.1, 4, "constant", step_size=0.01),
                               [0.01] * 5)
    half = 0.5 * (1 + np.sqrt(0.5))
    np.testing.assert_allclose(adversarial.step_sizes(0.1, 4, "cosine"),
                               [0.1, 0.1 * half, 0.05, 0.1 * (1 - half), 0.0], atol=1e-12)
    np.testing.assert_allclose(adversarial.step_sizes(0.1, 2, "cosine", step_size=0.3),
                               [0.3, 0.15, 0.0], atol=1e-12)
    # a first step of a quarter of epsilon: 0.025 * (1 + cos(pi k / 2)) / 2; constant ignores it
    np.testing.assert_allclose(adversarial.step_sizes(0.1, 2, "cosine", first_step=0.25),
                               [0.025, 0.0125, 0.0], atol=1e-12)
    np.testing.assert_allclose(adversarial.step_sizes(0.1, 4, "constant", first_step=0.25),
                               [0.0625] * 5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        adversarial.step_sizes(0.1, 4, "linear")


@pytest.mark.parametrize("attack, options", [
    (adversarial.pgd_accepted, {"schedule": "constant", "margin": 1e6}),
    (adversarial.pgd_accepted, {"schedule": "cosine", "margin": 1e6}),
    (adversarial.apgd_accepted, {"margin": 1e6}),
    (adversarial.apgd_accepted, {"margin": np.inf})])
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_pgd_and_apgd_reach_the_optimum_of_a_linear_loss(norm, attack, options):
    # Thresholds out of reach and a huge margin keep both hinges active (margin inf: none),
    # the loss is (t_1 - s_1 + m) + (s_0 - s_1 + m), whose descent direction is d = 2 w_1 - w_0.
    clean = (0.5 + np.random.default_rng(5).uniform(-0.1, 0.1, (1, H, H, 1))).astype(np.float32)
    d = 2 * WEIGHTS[:, 1].astype(np.float64) - WEIGHTS[:, 0]
    epsilon = 0.1 if norm == "2" else 0.05
    optimum = epsilon * (d / np.linalg.norm(d) if norm == "2" else np.sign(d))
    assert np.all(np.abs(optimum) < 0.3)  # clipping to [0, 1] never binds
    result = attack(_two_class_model, clean, [0], [1e6, 1e6], norm=norm, epsilon=epsilon,
                    steps=20, targets=[1], **options)
    np.testing.assert_allclose((result.adversarial - clean).reshape(-1), optimum, atol=1e-5)
    assert not result.success.any()


def _feasibility(image, label, thresholds, epsilon):
    """Linear programme: the largest z such that some wrong class j clears its threshold and
    leads every other class by z within the L-inf ball and [0, 1]; > 0 means feasible."""
    x = image.reshape(-1).astype(np.float64)
    w = WEIGHTS.astype(np.float64)
    bounds = [(lo, hi) for lo, hi in zip(np.maximum(0, x - epsilon) - x,
                                         np.minimum(1, x + epsilon) - x, strict=True)]
    best = -np.inf
    for j in set(range(3)) - {label}:
        rows = [w[:, j]] + [w[:, j] - w[:, i] for i in range(3) if i != j]
        limits = [thresholds[j]] + [0.0] * 2
        # maximise z subject to rows @ (x + delta) - limits >= z
        a = np.hstack([-np.array(rows), np.ones((3, 1))])
        b = np.array(rows) @ x - limits
        res = optimize.linprog(np.r_[np.zeros(len(x)), -1], A_ub=a, b_ub=b,
                               bounds=bounds + [(None, None)])
        best = max(best, -res.fun)
    return best


@pytest.fixture(scope="module")
def feasibility_case():
    """Two images with a wrong class in reach, one held back only by the threshold of class 2
    (its scores could win), one never able to win; thresholds [16, 16, 24.4]."""
    images = np.stack([_blend(.6, 0, 2), _blend(.6, 2, 1), _blend(.55, 2, 1), _blend(.55, 0, 2),
                       _blend(.6, 1, 0)])
    labels = numpy_logits(images).argmax(1)
    thresholds, epsilon = np.array([16.0, 16.0, 24.4]), 0.1
    z = np.array([_feasibility(x, y, thresholds, epsilon)
                  for x, y in zip(images, labels, strict=True)])
    assert (z > 0).tolist() == [True, True, False, True, False] and np.all(np.abs(z) > 0.2)
    # image 2's wrong classes cannot even reach their thresholds: s + epsilon * ||w||_1 < t
    reach = numpy_logits(images[2:3])[0] + epsilon * np.abs(WEIGHTS).sum(0) - thresholds
    assert np.all(reach[[0, 2]] < 0) and labels[2] == 1
    assert _feasibility(images[2], 1, [-1e9] * 3, epsilon) > 0  # scores alone would win
    return images, labels, thresholds, epsilon, z > 0


def _undetected_numpy(logits, labels, thresholds):
    predicted = logits.argmax(1)
    return (predicted != labels) & (logits[np.arange(len(logits)), predicted]
                                    >= thresholds[predicted])


def _in_linf_ball(result, images, epsilon):
    assert np.all(result.adversarial >= 0) and np.all(result.adversarial <= 1)
    assert np.abs(result.adversarial - images).max() <= epsilon + 1e-6


def test_pgd_accepted_succeeds_exactly_where_feasible(feasibility_case):
    images, labels, thresholds, epsilon, feasible = feasibility_case
    result = adversarial.pgd_accepted(linear_model, images, labels, thresholds, norm="inf",
                                      epsilon=epsilon, steps=50, restarts=2, batch_size=3)
    np.testing.assert_array_equal(result.success, feasible)
    _in_linf_ball(result, images, epsilon)
    np.testing.assert_allclose(result.logits, numpy_logits(result.adversarial), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_array_equal(
        result.success, _undetected_numpy(numpy_logits(result.adversarial), labels, thresholds))


def test_pgd_accepted_curve_and_smallest_epsilon(feasibility_case):
    images, labels, thresholds, epsilon, feasible = feasibility_case
    curve = adversarial.pgd_accepted_curve(linear_model, images, labels, thresholds,
                                           epsilons=(0.0, 0.03, epsilon), norm="inf", steps=50)
    assert curve.shares[0] == 0.0 and curve.shares[0] <= curve.shares[1] <= curve.shares[2]
    np.testing.assert_array_equal(curve.success[2], feasible)
    # each epsilon starts from the last one's result: a success holds at every larger one,
    # and every returned image lies in its own ball
    assert np.all(curve.success[:-1] <= curve.success[1:])
    for e, adv in zip(curve.epsilons, curve.adversarial, strict=True):
        assert np.abs(adv - images).max() <= e + 1e-6
    grown = adversarial.pgd_accepted_curve(linear_model, images, labels, thresholds,
                                           epsilons=(epsilon, 2 * epsilon), norm="inf",
                                           steps=50)
    hit = grown.success[0]
    assert hit.any()  # and those images are returned unchanged: the start already succeeds
    np.testing.assert_array_equal(grown.adversarial[1][hit], grown.adversarial[0][hit])
    # a curve stopped after its first epsilons goes on with the same result, restarts too
    grid, heard = (0.0, 0.03, epsilon, 2 * epsilon), []
    whole = adversarial.pgd_accepted_curve(
        linear_model, images, labels, thresholds, epsilons=grid, norm="inf", steps=20,
        restarts=2, on_result=lambda i, r: heard.append((i, r)))
    assert [i for i, _ in heard] == [0, 1, 2, 3]
    resumed = adversarial.pgd_accepted_curve(
        linear_model, images, labels, thresholds, epsilons=grid, norm="inf", steps=20,
        restarts=2, done=[r for _, r in heard[:2]])
    np.testing.assert_array_equal(resumed.success, whole.success)
    np.testing.assert_array_equal(resumed.adversarial, whole.adversarial)
    assert whole.success[-1].any() and not whole.success[0].any()  # not trivial
    # random restarts repeat with the seed; no images, no work
    runs = [adversarial.pgd_accepted(linear_model, images, labels, thresholds, norm="2",
                                     epsilon=0.5, steps=5, restarts=3, seed=7)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].adversarial, runs[1].adversarial)
    # an image's result does not depend on which others share its batch (each start attacks
    # only the images still without a success)
    alone = adversarial.pgd_accepted(linear_model, images, labels, thresholds, norm="2",
                                     epsilon=0.5, steps=5, restarts=3, seed=7, batch_size=1)
    np.testing.assert_allclose(alone.adversarial, runs[0].adversarial, atol=1e-6)
    np.testing.assert_array_equal(alone.success, runs[0].success)
    empty = adversarial.pgd_accepted(linear_model, images[:0], labels[:0], thresholds,
                                     norm="inf", epsilon=0.1, steps=5)
    assert empty.adversarial.shape == (0, H, H, 1) and empty.success.shape == (0,)
    smallest = adversarial.AcceptedCurve(
        (0.1, 0.2, 0.5), np.array([[0, 1, 0], [1, 1, 0], [1, 1, 0]], bool)).smallest_epsilon()
    assert smallest.tolist() == [0.2, 0.1, np.inf]


def _minimal_l2(image, target, thresholds):
    """The shortest delta with w_k.(x + delta) >= t_k and (w_k - w_i).(x + delta) >= 0, by
    enumerating which constraints are active (no box: the caller checks it does not bind)."""
    x, w = image.reshape(-1).astype(np.float64), WEIGHTS.astype(np.float64)
    a = np.array([w[:, target]] + [w[:, target] - w[:, i] for i in range(3) if i != target])
    b = np.array([thresholds[target], 0.0, 0.0]) - a @ x
    best = None
    for active in ([0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2]):
        rows = a[active]
        delta = rows.T @ np.linalg.solve(rows @ rows.T, b[active])
        if np.all(a @ delta >= b - 1e-9) and (best is None or
                                               np.linalg.norm(delta) < np.linalg.norm(best[1])):
            best = active, delta
    return best


def test_carlini_accepted_is_near_the_minimal_undetected_perturbation():
    images = np.stack([_blend(.6, 0, 2), _blend(.55, 0, 2), _blend(.6, 2, 1)])
    targets, thresholds = np.array([0, 1, 2]), np.array([14.2, 14.2, 19.8])
    minimal = [_minimal_l2(x, k, thresholds) for x, k in zip(images, targets, strict=True)]
    assert all(len(active) == 2 for active, _ in minimal)  # threshold and one rival bind
    for x, (_, delta) in zip(images, minimal, strict=True):
        assert 0 < (x.reshape(-1) + delta).min() and (x.reshape(-1) + delta).max() < 1
    result = adversarial.carlini_accepted(linear_model, images, targets, thresholds,
                                          steps=100, search_steps=5, batch_size=2)
    assert result.success.all()
    logits = numpy_logits(result.adversarial)
    rows = np.arange(3)
    # on the boundary, so float64 may differ from the model's float32 by rounding
    assert np.all(logits[rows, targets] >= thresholds[targets] - 1e-4)
    assert np.all(-_gap(logits, targets) <= 1e-4)
    l2, shortest = result.l2(images), np.array([np.linalg.norm(d) for _, d in minimal])
    assert np.all(l2 >= shortest - 1e-4) and np.all(l2 <= 1.02 * shortest), (l2, shortest)


def test_square_accepted_finds_the_easy_case_and_not_the_infeasible_one(feasibility_case):
    images, labels, thresholds, epsilon, feasible = feasibility_case
    pick = [0, 2]  # far inside the feasible region; held back by the threshold
    result = adversarial.square_accepted(linear_model, images[pick], labels[pick], thresholds,
                                         epsilon=epsilon, queries=500, seed=1)
    assert result.success.tolist() == [True, False]
    _in_linf_ball(result, images[pick], epsilon)
    np.testing.assert_array_equal(
        result.success, _undetected_numpy(numpy_logits(result.adversarial), labels[pick],
                                          thresholds))


def test_an_undetected_success_also_passes_the_gap():
    """With an ambiguity threshold the attacker must also lead the second class by min_gap:
    the acceptance is `rejection.decide`'s, and the margin loss asks for the gap."""
    rule = adversarial.Acceptance(np.array([1.0, 2.0, 3.0]), min_gap=1.5)
    scores = np.array([[0.0, 5.0, 1.0],   # class 1 leads class 2 by 4: accepted, wrong
                       [0.0, 5.0, 4.0],   # leads by 1 < 1.5: refused as ambiguous
                       [0.0, 5.0, 3.5]])  # leads by 1.5 exactly: accepted
    labels = np.array([0, 0, 0])
    assert adversarial.undetected_success(scores, labels, rule).tolist() == [True, False, True]
    assert adversarial.undetected_success(scores, labels, rule.thresholds).tolist() == [
        True, True, True]
    # row 1, towards class 1: over its threshold by 3, ahead of class 2 by 1: the gap hinge
    # relu(4 + 1.5 - 5) = 0.5; without min_gap relu(4 - 5) = 0
    packed = rule.packed()
    assert packed.tolist() == [1.0, 2.0, 3.0, 1.5]
    targets = np.array([1, 1, 1])
    np.testing.assert_allclose(adversarial.margin_loss(scores, labels, targets, packed)
                               .numpy(), [0.0, 0.5, 0.0])
    np.testing.assert_allclose(adversarial.margin_loss(scores, labels, targets,
                                                       rule.thresholds).numpy(), [0, 0, 0])


# AutoPGD, curves carried over a grid of budgets, transfer, the worst case over attacks.

def test_apgd_checkpoints_and_step_halving_by_hand():
    # Croce & Hein: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (steps 22, -3 down
    # to 6)
    assert adversarial.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert adversarial.checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]  # every period >= 1
    assert adversarial.checkpoints(1) == [1]
    # 8 steps since the last checkpoint: condition 1 holds when the loss fell on <= 6 of them;
    # condition 2 when the step was not halved then and the best loss has not fallen since
    falls = np.array([6, 7, 7, 7, 8])
    halved_before = np.array([False, False, True, False, False])
    best_before = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    best = np.array([0.5, 0.5, 1.0, 1.0, 0.9])
    assert apgd.halve(falls, 8, halved_before, best_before, best).tolist() == [
        True, False, False, True, False]


def test_apgd_accepted_succeeds_exactly_where_feasible(feasibility_case):
    images, labels, thresholds, epsilon, feasible = feasibility_case
    result = adversarial.apgd_accepted(linear_model, images, labels, thresholds, norm="inf",
                                       epsilon=epsilon, steps=50, restarts=2, batch_size=3)
    assert result.name == "apgd_accepted_linf"
    np.testing.assert_array_equal(result.success, feasible)
    _in_linf_ball(result, images, epsilon)
    np.testing.assert_array_equal(
        result.success, _undetected_numpy(numpy_logits(result.adversarial), labels, thresholds))


@pytest.mark.parametrize("curve", [
    adversarial.pgd_accepted_curve, adversarial.apgd_accepted_curve,
    functools.partial(adversarial.pgd_accepted_curve, start="other_classes")])
def test_curves_carry_successes_over_the_grid_as_the_linear_programme_says(feasibility_case,
                                                                           curve):
    """Each epsilon's figure is the feasible images at that epsilon (the linear programme);
    those feasible at the epsilon before are carried over, their images unchanged."""
    images, labels, thresholds, _, _ = feasibility_case
    grid = (0.04, 0.08, 0.1, 0.15)
    z = np.array([[_feasibility(x, y, thresholds, e) for x, y in zip(images, labels,
                                                                     strict=True)]
                  for e in grid])
    assert np.all(np.abs(z) > 0.05)  # no image on the edge of feasibility
    expected = z > 0
    assert expected.sum(1).tolist() == [0, 2, 3, 4]
    result = curve(linear_model, images, labels, thresholds, epsilons=grid, norm="inf",
                   steps=50, restarts=2, batch_size=2)
    np.testing.assert_array_equal(result.success, expected)
    np.testing.assert_array_equal(result.carried, np.r_[[[False] * 5], expected[:-1]])
    for e in range(1, len(grid)):
        kept = result.carried[e]
        np.testing.assert_array_equal(result.adversarial[e][kept], result.adversarial[e - 1][kept])


def test_other_class_starts_are_the_nearest_images_of_other_classes_in_the_ball():
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 1, (9, H, H, 1)).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    flat = images.reshape(9, -1).astype(np.float64)
    order = pgd.nearest_of_other_classes(images, labels)
    assert order.shape == (9, 5)  # the images of label 2 have the fewest others: 5
    for i in range(9):
        others = [j for j in range(9) if labels[j] != labels[i]]
        by_distance = sorted(others, key=lambda j: np.linalg.norm(flat[i] - flat[j]))
        assert order[i].tolist() == by_distance[:5]
    starts = pgd.from_other_classes(images, labels, "inf")
    for restart in (0, 6):  # restart 6 comes round to the second nearest
        other = images[order[:, restart % 5]]
        expected = np.clip(np.clip(other, images - 0.1, images + 0.1), 0, 1)
        np.testing.assert_allclose(starts(restart, None, images, 0.1, None), expected,
                                   atol=1e-6)
    np.testing.assert_allclose(starts(0, None, images, 1.0, None), images[order[:, 0]],
                               atol=1e-6)
    np.testing.assert_array_equal(pgd.nearest_of_other_classes(images[:3], labels[:3]),
                                  [[0], [1], [2]])  # one label: each image gets itself
    # a few rows at a time, or only the first two: the same order
    np.testing.assert_array_equal(pgd.nearest_of_other_classes(images, labels, chunk=2), order)
    np.testing.assert_array_equal(pgd.nearest_of_other_classes(images, labels, count=2),
                                  order[:, :2])


def test_pgd_from_other_classes_is_accepted_at_once_in_the_whole_cube():
    """Prototypes of three classes, all accepted: at epsilon 1 each starts at the nearest
    prototype of another class, an undetected success before any step."""
    labels = numpy_logits(PROTOS).argmax(1)
    assert labels.tolist() == [0, 1, 2]
    thresholds = np.full(3, -1e3)
    curve = adversarial.pgd_accepted_curve(linear_model, PROTOS, labels, thresholds,
                                           epsilons=(1.0,), norm="inf", steps=5,
                                           start="other_classes")
    flat = PROTOS.reshape(3, -1)
    nearest = [min((j for j in range(3) if j != i),
                   key=lambda j: np.linalg.norm(flat[i] - flat[j])) for i in range(3)]
    assert curve.success[0].all()
    np.testing.assert_allclose(curve.adversarial[0], PROTOS[nearest], atol=1e-6)
    with pytest.raises(ValueError, match="start must be one of"):
        adversarial.pgd_accepted(linear_model, PROTOS, labels, thresholds, norm="inf",
                                 epsilon=0.1, steps=2, start="target")


def _flagged(images):
    """Class 1 leads exactly when pixel (1, 1) is over 0.5: the fake attacks' way to win."""
    return tf.stack([tf.zeros_like(images[:, 0, 0, 0]), 10 * images[:, 1, 1, 0] - 5], 1)


def test_over_epsilons_attacks_only_the_images_without_a_success():
    """A fake attack that wins image i from epsilon needs[i] on, at its restart tries[i]:
    each epsilon takes over the last one's wins unattacked and each restart attacks only the
    images without a win; a smaller epsilon starts afresh."""
    needs = np.array([0.1, 0.1, 0.2, 0.3, 0.9])
    tries = np.array([0, 1, 0, 2, 0])
    images = np.zeros((5, H, H, 1), np.float32)
    images[:, 0, 0, 0] = np.arange(5) / 10  # the image's number, for the fake attack
    attacked, restart = {}, {"grid point": 0}

    def starts(r, rng, images, epsilon, first):
        restart["now"] = r
        restart["grid point"] += r == 0
        return first

    def attack(clean, start, labels, targets, thresholds, epsilon, rng):
        ids = np.rint(clean[:, 0, 0, 0] * 10).astype(int)
        attacked.setdefault((restart["grid point"], restart["now"]), []).extend(ids.tolist())
        hit = (epsilon >= needs[ids]) & (restart["now"] >= tries[ids])
        x = start.copy()
        x[hit, 1, 1, 0] = 1.0
        return x, np.where(hit, 0.0, 1.0).astype(np.float32), hit

    grid = (0.1, 0.2, 0.3, 0.2)
    results = list(adversarial.over_epsilons(
        "fake", attack, starts, _flagged, images, np.zeros(5, int), [-1e9, -1e9], grid,
        restarts=3, batch_size=2))
    success = np.array([r.success for r in results])
    # 0.2 after 0.3 starts afresh: image 1 needs its second restart again
    np.testing.assert_array_equal(success, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                            [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(adversarial.carried_over(grid, success), [
        [0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert attacked == {(1, 0): [0, 1, 2, 3, 4], (1, 1): [1, 2, 3, 4], (1, 2): [2, 3, 4],
                        (2, 0): [2, 3, 4], (2, 1): [3, 4], (2, 2): [3, 4],
                        (3, 0): [3, 4], (3, 1): [3, 4], (3, 2): [3, 4],
                        (4, 0): [0, 1, 2, 3, 4], (4, 1): [1, 3, 4], (4, 2): [3, 4]}
    # the carried images come back as they were found
    np.testing.assert_array_equal(results[2].adversarial[:3], results[1].adversarial[:3])


def test_square_curve_carries_its_successes_over(feasibility_case):
    images, labels, thresholds, _, _ = feasibility_case
    pick = [0, 2]  # feasible from 0.06 on; from 0.15 on (held back by the threshold)
    curve = adversarial.square_accepted_curve(linear_model, images[pick], labels[pick],
                                              thresholds, epsilons=(0.1, 0.15), queries=500,
                                              seed=1)
    assert curve.success[0].tolist() == [True, False]
    assert curve.carried.tolist() == [[False, False], [True, False]]
    np.testing.assert_array_equal(curve.adversarial[1][0], curve.adversarial[0][0])
    for e, adv, success in zip(curve.epsilons, curve.adversarial, curve.success, strict=True):
        assert np.abs(adv - images[pick]).max() <= e + 1e-6
        np.testing.assert_array_equal(
            success, _undetected_numpy(numpy_logits(adv), labels[pick], thresholds))


TARGET_WEIGHTS = (WEIGHTS[:, :2] + np.random.default_rng(3).normal(0, 0.5, (H * H, 2))
                  ).astype(np.float32)


@tf.autograph.experimental.do_not_convert
def _target_model(images):
    return tf.reshape(images, [-1, H * H]) @ TARGET_WEIGHTS


def test_transfer_crafts_on_the_source_and_asks_the_target():
    """On the two-class linear source the crafted example is the corner of the ball along
    sign(2 w_1 - w_0) (the unhinged loss falls along it without end); the target judges it
    by its own weights and thresholds, and an image it accepts wrongly is carried over."""
    images = np.stack([_blend(a, 0, 2) for a in (1.0, 0.9, 0.8)])
    labels = np.zeros(3, int)
    source_rule, target_rule = np.array([0.0, 0.0]), np.array([-1e9, 19.1])
    grid = (0.05, 0.1, 0.2)
    d = np.sign(2 * WEIGHTS[:, 1].astype(np.float64) - WEIGHTS[:, 0]).reshape(H, H, 1)
    crafted = np.stack([np.clip(images + np.float32(e) * d, 0, 1) for e in grid])

    def wrong_and_accepted(weights, x, thresholds):
        scores = x.reshape(-1, H * H).astype(np.float64) @ weights
        return (scores[:, 1] > scores[:, 0]) & (scores[:, 1] >= thresholds[1]), scores

    hits = np.array([wrong_and_accepted(TARGET_WEIGHTS, c, target_rule)[0] for c in crafted])
    # by hand: at 0.1 the 0.8 blend is wrong on the target but below 19.1 (19.02), rejected
    assert hits.tolist() == [[False] * 3, [False, True, False], [True, True, True]]
    _, scores = wrong_and_accepted(TARGET_WEIGHTS, crafted[1], target_rule)
    assert np.all(np.abs(scores[:, 1] - target_rule[1]) > 0.05)
    curve, on_source = adversarial.transfer_accepted_curve(
        _two_class_model, source_rule, _target_model, target_rule, images, labels,
        epsilons=grid, steps=10, batch_size=2)
    expected = np.logical_or.accumulate(hits, axis=0)
    np.testing.assert_array_equal(curve.success, expected)
    np.testing.assert_array_equal(curve.carried, [[0, 0, 0], [0, 0, 0], [0, 1, 0]])
    # the carried image keeps its example from 0.1; the others are the corners of their ball
    np.testing.assert_allclose(curve.adversarial[2][1], crafted[1][1], atol=1e-6)
    for e in range(3):
        fresh = ~curve.carried[e]
        np.testing.assert_allclose(curve.adversarial[e][fresh], crafted[e][fresh], atol=1e-6)
    np.testing.assert_allclose(curve.scores, curve.adversarial.reshape(3, 3, -1)
                               @ TARGET_WEIGHTS, rtol=1e-5, atol=1e-4)
    on_source_numpy = np.array([wrong_and_accepted(WEIGHTS[:, :2], x, source_rule)[0]
                                for x in curve.adversarial])
    np.testing.assert_array_equal(on_source, on_source_numpy)
    assert on_source[1, 2] and not curve.success[1, 2]  # the source falls, the target holds


def test_worst_case_is_the_union_of_the_attacks_successes():
    """By hand: three images, two budgets; each attack's examples by image, size and
    success."""
    epsilons = (0.1, 0.3)
    # a curve: one example per image and budget (sizes within their budget)
    curve = adversarial.success_within([0, 1, 2, 0, 1, 2], [0.1, 0.05, 0.1, 0.3, 0.3, 0.2],
                                       [False, True, False, True, True, False], epsilons, 3)
    assert curve.tolist() == [[False, True, False], [True, True, False]]
    # a minimal attack: image 0 at 0.25, image 2 at 0.1000004 (rounding: within 0.1),
    # image 1 at 0.1 but not accepted; image 5 lies outside the 3 images counted
    minimal = adversarial.success_within([0, 1, 2, 5], [0.25, 0.1, 0.1000004, 0.01],
                                         [True, False, True, True], epsilons, 3)
    assert minimal.tolist() == [[False, False, True], [True, False, True]]
    # a targeted attack, two examples per image: image 1's second succeeds at 0.2
    targeted = adversarial.success_within([0, 0, 1, 1, 2, 2], [0.5, 0.5, 0.4, 0.2, 0.4, 0.4],
                                          [True, True, False, True, False, False], epsilons, 3)
    assert targeted.tolist() == [[False, False, False], [False, True, False]]
    worst = adversarial.worst_case({"curve": curve, "minimal": minimal, "cw": targeted})
    assert worst["undetected"].tolist() == [[False, True, True], [True, True, True]]
    assert worst["found"] == {"curve": [1, 2], "minimal": [1, 2], "cw": [0, 1]}
    # only one attack found it: at 0.1 image 1 (curve) and image 2 (minimal); at 0.3 image 2
    assert worst["only"] == {"curve": [1, 0], "minimal": [1, 1], "cw": [0, 0]}
    sizes = adversarial.perturbation_sizes(np.ones((2, 2, 2, 1)) * [[[[0.3]]], [[[0.0]]]],
                                           np.zeros((2, 2, 2, 1)), "2")
    np.testing.assert_allclose(sizes, [0.6, 0.0])
