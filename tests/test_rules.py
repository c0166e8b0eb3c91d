"""The threshold rules behind the registry (sdim_tf.rules): the paper's percentile and split
conformal, per class or shared, against hand computations and sdim_tf.conformal."""

import json
import math

import numpy as np
import pytest

from sdim_tf import conformal, rules

# Three classes; class 2 is never predicted correctly.
SCORES = np.array([
    [-1.0, -9.0, -9.0],  # class 0, correct
    [-3.0, -9.0, -9.0],  # class 0, correct
    [-9.0, -2.0, -9.0],  # class 0, wrong (predicted 1)
    [-9.0, -4.0, -9.0],  # class 1, correct
    [-9.0, -9.0, -1.0],  # class 1, wrong (predicted 2)
])
LABELS = np.array([0, 0, 0, 1, 1])


def test_registry_finds_each_rule_by_name():
    assert rules.RULES.names() == ("ambiguous", "conformal", "percentile")
    assert rules.get("percentile") is rules.Percentile
    assert rules.get("conformal") is rules.SplitConformal
    assert rules.get("ambiguous") is rules.Ambiguous
    assert {rules.get(n).refusal for n in rules.RULES.names()} == {"unfamiliar", "ambiguous"}
    with pytest.raises(ValueError, match="unknown rule 'median'; known: ambiguous, conformal, "
                                         "percentile"):
        rules.get("median")
    with pytest.raises(ValueError, match="registered twice"):
        rules.register(rules.Percentile)


def test_percentile_per_class_and_shared_by_hand():
    per_class = rules.Percentile(percentile=1).calibrate(SCORES, LABELS)
    # correct scores: class 0 {-1, -3}, class 1 {-4}, class 2 none
    np.testing.assert_array_equal(per_class.thresholds, [-3.0, -4.0, math.inf])
    assert per_class.record == {
        "rule": "percentile", "grouping": "per_class", "percentile": 1, "counts": [2, 1, 0],
        "promise": "refuses scores below the 1th percentile of the correctly classified "
                   "calibration images of each class; it promises no rejection rate for new "
                   "images"}
    # shared: {-4, -3, -1} sorted; the 50th percentile is index floor(1.5) = 1
    shared = rules.Percentile(percentile=50, grouping="shared").calibrate(SCORES, LABELS)
    np.testing.assert_array_equal(shared.thresholds, [-3.0, -3.0, -3.0])
    assert shared.record["counts"] == [2, 1, 0]
    json.dumps(shared.record)
    with pytest.raises(ValueError, match="grouping must be one of per_class, shared"):
        rules.Percentile(grouping="pooled")
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\)"):
        rules.Percentile(percentile=100)


def test_split_conformal_shared_and_mondrian():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(600, 3))
    labels = rng.integers(0, 3, 600)
    top, predicted = scores.max(1), scores.argmax(1)
    shared = rules.SplitConformal(alpha=0.05, confidence=0.9).calibrate(scores, labels)
    expected = conformal.threshold(top, 0.05, 0.9)
    np.testing.assert_array_equal(shared.thresholds, [expected] * 3)
    assert shared.record["counts"] == [600] * 3 and shared.record["n"] == 600
    assert shared.promise == conformal.promise(0.05, 0.9, 600)
    per_class = rules.SplitConformal(alpha=0.05, confidence=None,
                                     grouping="per_class").calibrate(scores, labels)
    np.testing.assert_array_equal(per_class.thresholds, [
        conformal.threshold(top[predicted == c], 0.05) for c in range(3)])
    assert per_class.record["counts"] == np.bincount(predicted, minlength=3).tolist()
    assert per_class.promise.endswith("; for each predicted class")
    json.dumps(per_class.record)


def test_split_conformal_names_what_is_short():
    scores = np.eye(3)[[0] * 80 + [1] * 4 + [2] * 2]
    labels = scores.argmax(1)
    with pytest.raises(rules.CalibrationError,
                       match=r"too few held-out images predicted as \['b \(4\)', 'c \(2\)'\] "
                             r"for a per-class 4% guarantee \(each class needs 74\)"):
        rules.SplitConformal(grouping="per_class").calibrate(scores, labels, ["a", "b", "c"])
    # shared, too few for the promise asked: the strongest 10 images support, on average at
    # 1 / (10 + 1), whose threshold is the lowest top score
    few = rules.SplitConformal().calibrate(scores[:10] + np.arange(10)[:, None], labels[:10])
    assert few.record["alpha"] == pytest.approx(1 / 11) and few.record["confidence"] is None
    assert few.record["asked"] == {"alpha": 0.04, "confidence": 0.95}
    assert few.thresholds.tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="alpha must lie in"):
        rules.SplitConformal(alpha=0)


def test_percentile_with_a_budget_is_the_largest_within_it():
    """The monitor's rule: the largest percentile (steps of 0.05) whose shared threshold
    rejects at most the budget of the calibration images, checked against numpy."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(400, 3))
    labels = np.where(rng.uniform(size=400) < 0.8, scores.argmax(1), rng.integers(0, 3, 400))
    chosen = rules.Percentile(grouping="shared", budget=0.1).calibrate(scores, labels)
    top, correct = scores.max(1), scores.argmax(1) == labels
    ordered = np.sort(top[correct])

    def rejected(p):  # the authors' percentile: index floor(p / 100 * n)
        return (top < ordered[int(np.floor(p / 100 * len(ordered)))]).mean()

    p = chosen.record["percentile"]
    assert rejected(p) <= 0.1 < rejected(p + 0.05)
    np.testing.assert_array_equal(chosen.thresholds,
                                  [ordered[int(np.floor(p / 100 * len(ordered)))]] * 3)
    assert chosen.record["budget"] == 0.1 and "the largest rejecting at most 10%" in \
        chosen.promise
    with pytest.raises(ValueError, match=r"budget must lie in \(0, 1\)"):
        rules.Percentile(budget=1.5)


def test_rules_built_from_settings_and_listed_by_refusal():
    assert rules.names("unfamiliar") == ("conformal", "percentile")
    assert rules.names("ambiguous") == ("ambiguous",)
    # settings a rule does not have are left out; the others keep their defaults
    assert rules.build("conformal", {"alpha": 0.1, "max_error": 0.2, "grouping": "per_class"}
                       ) == rules.SplitConformal(alpha=0.1, grouping="per_class")
    assert rules.build("ambiguous", {"max_error": 0.2}) == rules.Ambiguous(max_error=0.2)


def test_calibrate_both_names_the_rule_that_cannot_keep_its_promise():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
    with pytest.raises(rules.CalibrationError, match=r"^conformal: too few held-out images "
                                                     r"predicted as"):
        rules.calibrate_both(scores, labels, rules.SplitConformal(grouping="per_class"),
                             rules.Ambiguous(max_error=0.01))
    with pytest.raises(rules.CalibrationError, match=r"^ambiguous: no gap threshold"):
        rules.calibrate_both(scores, labels, rules.Percentile(grouping="shared"),
                             rules.Ambiguous(max_error=0.01))
