"""The second refusal: answers that would too often be wrong (selective classification
with a guaranteed error rate).

The unfamiliar thresholds keep their promise on false rejections; they promise nothing on
how often an accepted answer is wrong. `Ambiguous` adds one threshold on a confidence
score, the gap (`rejection.gap`: the best class score minus the second best), such that,
among the images both refusals accept, at most `max_error` are misclassified, with
probability `confidence` over the draw of the calibration images: SGR (Geifman & El-Yaniv
2017, "Selective classification for deep neural networks", algorithm 1). A binary search
over the calibration gaps tests at most k = ceil(log2(m + 1)) of them as thresholds; each
gets the Clopper-Pearson upper bound of its error rate at level delta / k (delta =
1 - confidence; the union bound over the tests), and the lowest tested threshold whose
bound is at most `max_error` is kept, so that the promise is `max_error` itself.
tests/test_ambiguous.py checks it over repeated draws.

Which images: only those the unfamiliar thresholds accept, since the promise is about the
answers given; and not the images that chose those thresholds, so that given them the
errors among the images that pass are a binomial draw. `calibrate_both` therefore splits
the held-out images by position, even ones for the unfamiliar rule and odd ones for this
one: a split fixed before any score is seen keeps each half exchangeable with new images,
and interleaving spreads both halves over the whole held-out range.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

from sdim_tf import rejection
from sdim_tf.rules.registry import Calibrated, CalibrationError, percent, register


@register
@dataclasses.dataclass(frozen=True)
class Ambiguous:
    """At most `max_error` wrong answers among the accepted ones, with probability
    `confidence` over the calibration draw."""

    name = "ambiguous"
    refusal = rejection.AMBIGUOUS

    max_error: float = 0.02
    confidence: float = 0.95

    def __post_init__(self):
        for name in ("max_error", "confidence"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")

    def calibrate(self, class_scores, labels, class_names=None,
                  thresholds=None) -> Calibrated:
        """The gap threshold on held-out `class_scores` [N, C] and `labels`, counting
        only the images that pass the unfamiliar `thresholds` [C] (None: all of them)."""
        scores, labels = rejection.check_scores(class_scores, labels)
        decision = rejection.decide(scores, np.full(scores.shape[1], -np.inf)
                                    if thresholds is None else thresholds)
        passed = ~decision.unfamiliar.numpy()
        wrong = decision.class_ids.numpy()[passed] != labels[passed]
        search = selective_threshold(decision.gap.numpy()[passed], wrong,
                                     self.max_error, 1 - self.confidence)
        if not math.isfinite(search["threshold"]):
            raise CalibrationError(
                f"no gap threshold keeps the error rate at most "
                f"{percent(self.max_error)} with {percent(self.confidence)} confidence on "
                f"{int(passed.sum())} held-out images ({int(wrong.sum())} misclassified); "
                "allow a larger error rate or hold out more images")
        return Calibrated(np.float64(search["threshold"]), {
            "rule": self.name, "max_error": self.max_error, "confidence": self.confidence,
            "n": int(passed.sum()), **{k: v for k, v in search.items() if k != "threshold"},
            "promise": self.promise(int(passed.sum()))})

    def promise(self, n: int) -> str:
        return (f"at most {percent(self.max_error)} of the answers it gives are wrong, with "
                f"{percent(self.confidence)} confidence, for images drawn like the "
                f"calibration images ({n} that passed the unfamiliar threshold; selective "
                "classification with guaranteed risk); it promises nothing for a shifted "
                "population")


def upper_bound(errors: int, n: int, delta: float) -> float:
    """Clopper-Pearson: the error rate b with P(Binomial(n, b) <= errors) = delta, the
    largest rate still consistent with `errors` of `n` at level delta; 1 for n = errors."""
    return 1.0 if errors >= n else float(stats.beta.ppf(1 - delta, errors + 1, n - errors))


def selective_threshold(kappa, wrong, max_error: float, delta: float) -> dict:
    """SGR: {"threshold" (+inf: none passes), "accepted", "errors", "bound" at it,
    "tests": k} for accepting confidence `kappa` >= threshold, where `wrong` marks the
    misclassified images. Tied confidences are accepted or refused together."""
    kappa = np.asarray(kappa, np.float64)
    order = np.argsort(kappa, kind="stable")
    kappa, wrong = kappa[order], np.asarray(wrong, bool)[order]
    m = len(kappa)
    tests = _tests(m)
    errors_from = np.concatenate([np.cumsum(wrong[::-1])[::-1], [0]])  # among kappa[z:]
    passed = {m: (0, 0, 0.0)}  # refusing everything: no answer, no error
    lo, hi = 0, m
    while lo < hi:  # each test halves [lo, hi): at most `tests` of them
        theta = kappa[(lo + hi) // 2]
        first, after = np.searchsorted(kappa, theta, "left"), np.searchsorted(kappa, theta,
                                                                              "right")
        n, errors = m - first, int(errors_from[first])
        bound = upper_bound(errors, n, delta / tests)
        if bound <= max_error:
            passed[first], hi = (n, errors, bound), first
        else:
            lo = after
    accepted, errors, bound = passed[hi]
    return {"threshold": float(kappa[hi]) if hi < m else math.inf, "accepted": int(accepted),
            "errors": errors, "bound": bound, "tests": tests}


def _tests(m: int) -> int:
    """How many thresholds SGR's binary search tests on m images: ceil(log2(m + 1))."""
    return max(1, math.ceil(math.log2(m + 1)))


def minimum_samples(max_error: float, confidence: float) -> int:
    """The fewest calibration images (passing the unfamiliar rule) on which SGR can keep
    `max_error` at all: with none misclassified, its first test, at the median gap, accepts
    m - m // 2 of m images, and every later test that could pass accepts more."""
    delta, m = 1 - confidence, 1
    while upper_bound(0, m - m // 2, delta / _tests(m)) > max_error:
        m += 1
    return m


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out rows for the unfamiliar rule (even positions) and for `Ambiguous` (odd)."""
    rows = np.arange(n)
    return rows[0::2], rows[1::2]


def calibrate_both(class_scores, labels, unfamiliar, ambiguous: Ambiguous | None = None,
                   class_names=None) -> tuple[Calibrated, Calibrated | None]:
    """Both refusals on held-out images: without `ambiguous`, `unfamiliar` on all of them;
    with it, each on its half (`split`). A CalibrationError starts with the rule's name."""
    scores, labels = rejection.check_scores(class_scores, labels)
    first, second = split(len(labels)) if ambiguous is not None else (slice(None), None)
    thresholds = _named(unfamiliar, scores[first], labels[first], class_names)
    if ambiguous is None:
        return thresholds, None
    return thresholds, _named(ambiguous, scores[second], labels[second], class_names,
                              thresholds.thresholds)


def _named(rule, *args) -> Calibrated:
    try:
        return rule.calibrate(*args)
    except CalibrationError as e:
        named = CalibrationError(f"{rule.name}: {e}")
        named.refusal = rule.refusal  # which of the two refusals could not be calibrated
        raise named from None
