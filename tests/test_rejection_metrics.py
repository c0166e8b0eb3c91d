"""Thresholds, the decision with rejection and the OOD metrics on hand-made cases."""

import itertools
import math

import numpy as np
import pytest

from sdim_tf import metrics, rejection


def test_percentile_rule_is_floor_index():
    scores = np.arange(250, dtype=float)[::-1]  # 249 .. 0
    assert rejection.percentile_value(scores, 1) == 2.0  # floor(0.01 * 250) = 2
    assert rejection.percentile_value(scores, 2) == 5.0  # floor(0.02 * 250) = 5
    assert rejection.percentile_value([7.0], 2) == 7.0


def test_calibrate_uses_correct_samples_of_each_class():
    ll = np.array([
        [-1.0, -9.0, -9.0],  # class 0, correct
        [-3.0, -9.0, -9.0],  # class 0, correct
        [-9.0, -2.0, -9.0],  # class 0, wrong (predicted 1): left out
        [-9.0, -4.0, -9.0],  # class 1, correct
        [-9.0, -9.0, -1.0],  # class 1, wrong: left out
    ])
    labels = np.array([0, 0, 0, 1, 1])
    result = rejection.calibrate(ll, labels, percentiles=(1, 60))
    np.testing.assert_array_equal(result[1]["thresholds"], [-3.0, -4.0, math.inf])
    assert result[1]["counts"] == [2, 1, 0]
    np.testing.assert_array_equal(result[60]["thresholds"], [-1.0, -4.0, math.inf])
    as_json = rejection.to_json(result)
    assert as_json["1"]["thresholds"] == [-3.0, -4.0, None]
    back = rejection.from_json(as_json)
    np.testing.assert_array_equal(back[1]["thresholds"], result[1]["thresholds"])


def test_budget_percentile_against_brute_force():
    rng = np.random.default_rng(3)
    ll = rng.normal(size=(400, 3)) * 5
    labels = rng.integers(0, 3, 400)
    predicted, top = ll.argmax(1), ll.max(1)

    def reject_rate(p):  # thresholds by hand: value at index floor(p/100 n) of sorted scores
        thresholds = []
        for c in range(3):
            scores = np.sort(top[(labels == c) & (predicted == c)])
            thresholds.append(scores[min(int(np.floor(p / 100 * len(scores))), len(scores) - 1)])
        return (top < np.array(thresholds)[predicted]).mean()

    grid = [round(0.05 * i, 4) for i in range(1000)]
    for budget in (0.05, 0.1, 0.3):
        expected = 0.0
        for p in grid:
            if reject_rate(p) > budget:
                break
            expected = p
        got = rejection.budget_percentile(ll, labels, budget)
        assert got == pytest.approx(expected)
        assert reject_rate(got) <= budget < reject_rate(got + 0.05)
    with pytest.raises(ValueError, match="budget"):
        rejection.budget_percentile(ll, labels, 1.5)


def test_shared_thresholds_and_their_budget():
    ll = np.array([[5.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, 1.0], [2.0, 0.0], [0.0, 9.0]])
    labels = np.array([0, 0, 1, 1, 1, 1])  # sample 4 is misclassified (predicts 0)
    # correct top scores: 5, 3, 4, 1, 9 -> sorted 1, 3, 4, 5, 9
    result = rejection.calibrate(ll, labels, (0, 20, 40), shared=True)
    np.testing.assert_array_equal(result[0]["thresholds"], [1.0, 1.0])
    np.testing.assert_array_equal(result[20]["thresholds"], [3.0, 3.0])  # index floor(1.0)
    np.testing.assert_array_equal(result[40]["thresholds"], [4.0, 4.0])  # index 2
    # Rejected at p=20: scores below 3 -> 1 and the misclassified 2 -> 2 of 6.
    assert rejection.budget_percentile(ll, labels, 2 / 6, shared=True) == pytest.approx(39.95)
    assert rejection.budget_percentile(ll, labels, 1.5 / 6, shared=True) == pytest.approx(19.95)


def test_decide_equation_9():
    ll = np.array([[-1.0, -5.0], [-5.0, -3.0], [-2.5, -9.0], [np.nan, np.nan], [-4, -3.5]])
    decision = rejection.decide(ll, [-2.0, math.inf])
    np.testing.assert_array_equal(decision.class_ids.numpy()[:3], [0, 1, 0])
    np.testing.assert_array_equal(decision.score.numpy()[[0, 1, 2, 4]], [-1, -3, -2.5, -3.5])
    np.testing.assert_array_equal(decision.threshold.numpy()[:3], [-2.0, math.inf, -2.0])
    np.testing.assert_array_equal(decision.rejected.numpy(), [False, True, True, True, True])
    # invalid inputs are rejected whatever their score
    valid = np.array([False, True, True, True, True])
    np.testing.assert_array_equal(rejection.decide(ll, [-2.0, math.inf], valid).rejected,
                                  [True, True, True, True, True])


def test_decide_with_the_ambiguity_threshold():
    scores = np.array([
        [-1.0, -5.0, -2.0],  # passes -2: gap 1.0 < 1.5 -> ambiguous
        [-5.0, -3.0, -9.0],  # below -2.5 and gap 2.0: unfamiliar takes precedence
        [0.0, -4.0, -1.0],  # passes -2, gap 1.0: ambiguous
        [3.0, -9.0, 1.0],  # gap 2.0: accepted
        [-1.0, -1.0, -8.0],  # a tie: gap 0 -> ambiguous
        [3.0, -9.0, 1.0],  # an invalid row: neither reason, rejected
    ])
    valid = np.array([True, True, True, True, True, False])
    thresholds = [-2.0, -2.5, -2.0]
    decision = rejection.decide(scores, thresholds, valid, min_gap=1.5)
    np.testing.assert_array_equal(decision.gap.numpy(), [1.0, 2.0, 1.0, 2.0, 0.0, -np.inf])
    np.testing.assert_array_equal(decision.min_gap.numpy(), [1.5] * 6)
    np.testing.assert_array_equal(decision.unfamiliar.numpy(), [0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(decision.ambiguous.numpy(), [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(decision.rejected.numpy(), [1, 1, 1, 0, 1, 1])
    assert decision.reasons().numpy().tolist() == [
        b"ambiguous", b"unfamiliar", b"ambiguous", b"", b"ambiguous", b""]
    # without min_gap: equation 9 alone, bit for bit, and no row is ambiguous
    alone = rejection.decide(scores, thresholds, valid)
    np.testing.assert_array_equal(alone.rejected.numpy(), [0, 1, 0, 0, 0, 1])
    assert not alone.ambiguous.numpy().any()
    np.testing.assert_array_equal(alone.min_gap.numpy(), [-np.inf] * 6)
    # one class: nothing to be ambiguous with
    assert rejection.gap(np.zeros((2, 1))).numpy().tolist() == [np.inf, np.inf]


def test_percentile_key():
    assert [rejection.percentile_key(p) for p in (1, 1.0, "2", 3.55, "3.6")] == [1, 1, 2, 3.55,
                                                                                  3.6]
    assert isinstance(rejection.percentile_key(2.0), int)


def test_bad_calibration_input():
    with pytest.raises(ValueError, match="class_scores must be"):
        rejection.calibrate(np.zeros((3, 2)), np.zeros(4))


def test_selective_and_detection_rates():
    ll = np.array([[-1.0, -5.0], [-5.0, -1.0], [-3.0, -9.0], [-9.0, -0.5]])
    labels = np.array([0, 0, 0, 1])
    result = metrics.selective(ll, labels, [-2.0, -2.0])
    assert result == {"accuracy": 0.75, "accuracy_left": 2 / 3, "reject_rate": 0.25}
    ood = np.array([[-1.0, -3.0], [-3.0, -3.0], [-5.0, -1.0]])
    # class 0: 2 of 3 below -2; class 1: 2 of 3 below -2 -> 2/3.
    assert metrics.classwise_detection_rate(ood, [-2.0, -2.0]) == pytest.approx(2 / 3)
    # rule: sample 0 kept (class 0, -1), sample 1 rejected, sample 2 kept.
    assert metrics.decision_rejection_rate(ood, [-2.0, -2.0]) == pytest.approx(1 / 3)


def _auroc_pairs(s_in, s_out):
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0
               for a, b in itertools.product(s_in, s_out))
    return wins / (len(s_in) * len(s_out))


def test_auroc_with_ties_against_pair_counting():
    assert metrics.auroc([3, 2], [2, 1]) == 0.875  # by hand: (1 + 1 + 0.5 + 1) / 4
    rng = np.random.default_rng(0)
    for _ in range(20):
        s_in = rng.integers(0, 6, 15).astype(float)
        s_out = rng.integers(0, 6, 11).astype(float)
        assert metrics.auroc(s_in, s_out) == pytest.approx(_auroc_pairs(s_in, s_out))


def test_average_precision_by_hand():
    # thresholds 3: P=1, R=.5; 2: P=2/3, R=1  ->  0.5 * 1 + 0.5 * 2/3
    assert metrics.average_precision([3, 2], [2, 1]) == pytest.approx(0.5 + 1 / 3)
    assert metrics.average_precision([5, 4], [1, 0]) == 1.0


def test_fpr_at_95_tpr():
    s_in = np.arange(100, dtype=float)  # accepting 95%: threshold 5
    s_out = np.array([4.0, 5.0, 6.0, 100.0])
    assert metrics.fpr_at_tpr(s_in, s_out) == 0.75
    assert (s_in >= 5).mean() == 0.95


def test_scores():
    logits = np.array([[1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(metrics.ood_scores(logits, "max_log_likelihood"), [2.0, 0.0])
    np.testing.assert_allclose(metrics.ood_scores(logits, "energy"),
                               [np.log(np.e + np.e ** 2), np.log(2)])
    np.testing.assert_allclose(metrics.ood_scores(logits, "max_softmax"),
                               [np.e ** 2 / (np.e + np.e ** 2), 0.5])
    separated = metrics.separation(np.array([[5.0, 0.0]] * 3), np.array([[1.0, 0.0]] * 2),
                                   ["max_logit"])
    assert separated["max_logit"] == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0,
                                      "fpr_at_95_tpr": 0.0}
