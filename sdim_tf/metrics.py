"""Selective-classification and out-of-distribution metrics (paper Tables 2 and 3, and more).

Scores follow one convention: higher means more in-distribution. Positives of AUROC/AUPR-in
are in-distribution samples.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from sdim_tf import rejection


def selective(log_likelihoods, labels, thresholds) -> dict:
    """Table 2: accuracy, accuracy on the kept samples and the reject rate."""
    decision = rejection.decide(log_likelihoods, thresholds)
    predicted, rejected = decision.class_ids.numpy(), decision.rejected.numpy()
    correct = predicted == np.asarray(labels)
    kept = ~rejected
    return {"accuracy": float(correct.mean()),
            "accuracy_left": float(correct[kept].mean()) if kept.any() else float("nan"),
            "reject_rate": float(rejected.mean())}


def classwise_detection_rate(ood_log_likelihoods, thresholds) -> float:
    """Table 3: for each class c the share of OOD samples with log p(x|c) < delta_c, averaged."""
    ll = np.asarray(ood_log_likelihoods, np.float64)
    return float(np.mean([(ll[:, c] < t).mean() for c, t in enumerate(thresholds)]))


def decision_rejection_rate(ood_log_likelihoods, thresholds) -> float:
    """The share of OOD samples the deployed rule (equation 9) rejects."""
    return float(rejection.decide(ood_log_likelihoods, thresholds).rejected.numpy().mean())


def auroc(in_scores, out_scores) -> float:
    """P(score_in > score_out) + P(tie) / 2 (Mann-Whitney U with average ranks)."""
    s_in, s_out = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    ranks = _average_ranks(np.concatenate([s_in, s_out]))
    n_in, n_out = len(s_in), len(s_out)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def average_precision(positive_scores, negative_scores) -> float:
    """Area under precision-recall, sum over distinct thresholds of (R_k - R_k-1) * P_k."""
    pos, neg = np.asarray(positive_scores, np.float64), np.asarray(negative_scores, np.float64)
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(is_pos)[last_of_tie]
    seen = (np.arange(1, len(scores) + 1))[last_of_tie]
    precision, recall = tp / seen, tp / len(pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95) -> float:
    """Share of OOD samples accepted at the threshold accepting `tpr` of the in-distribution.

    The threshold is the largest t with mean(in_scores >= t) >= tpr.
    """
    s_in = np.sort(np.asarray(in_scores, np.float64))
    t = s_in[int(np.floor((1 - tpr) * len(s_in) + 1e-9))]
    return float((np.asarray(out_scores) >= t).mean())


def ood_scores(logits, kind: str) -> np.ndarray:
    """Per-sample scores (higher = in-distribution) from [N, C] log-likelihoods or logits."""
    logits = np.asarray(logits, np.float64)
    if kind in ("max_log_likelihood", "max_logit"):
        return logits.max(axis=1)
    if kind in ("logsumexp", "energy"):  # energy score = -E(x) = logsumexp of the logits
        return special.logsumexp(logits, axis=1)
    if kind == "max_softmax":
        return special.softmax(logits, axis=1).max(axis=1)
    raise ValueError(f"unknown score {kind!r}")


SDIM_SCORES = ("max_log_likelihood", "logsumexp")
DISCRIMINATIVE_SCORES = ("max_softmax", "max_logit", "energy")


def separation(in_logits, out_logits, kinds) -> dict:
    """AUROC, AUPR-in, AUPR-out and FPR at 95% TPR for each score kind."""
    result = {}
    for kind in kinds:
        s_in, s_out = ood_scores(in_logits, kind), ood_scores(out_logits, kind)
        result[kind] = {"auroc": auroc(s_in, s_out),
                        "aupr_in": average_precision(s_in, s_out),
                        "aupr_out": average_precision(-s_out, -s_in),
                        "fpr_at_95_tpr": fpr_at_tpr(s_in, s_out)}
    return result


def silent_error(predicted, labels, rejected) -> float:
    """The share of ALL samples that are accepted and wrong: the errors nobody is warned of.

    A share of all samples (not of the accepted ones), so rejecting more never raises it.
    """
    predicted, labels = np.asarray(predicted).reshape(-1), np.asarray(labels).reshape(-1)
    rejected = np.asarray(rejected, bool).reshape(-1)
    if not len(predicted) == len(labels) == len(rejected) or not len(labels):
        raise ValueError(f"need equally many predictions, labels and rejection flags (> 0), got "
                         f"{len(predicted)}, {len(labels)}, {len(rejected)}")
    return float(np.mean(~rejected & (predicted != labels)))


def risk_coverage(scores, correct) -> dict:
    """The risk-coverage curve of selective classification and its area (AURC).

    Samples are accepted by descending score (higher = more confident). The curve is evaluated
    only where a threshold can fall, i.e. at the last index k of each group of equal scores:
    coverage k / N and risk = errors among the k best / k. `aurc` is
    sum_i (coverage_i - coverage_{i-1}) * risk_i with coverage_0 = 0; without ties that is the
    usual mean over k = 1..N of risk@k.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    correct = np.asarray(correct, bool).reshape(-1)
    if len(scores) != len(correct) or not len(scores):
        raise ValueError(f"need equally many scores and correctness flags (> 0), got "
                         f"{len(scores)} and {len(correct)}")
    order = np.argsort(-scores, kind="mergesort")
    ordered = scores[order]
    last_of_tie = np.r_[ordered[1:] != ordered[:-1], True]
    errors = np.cumsum(~correct[order])[last_of_tie]
    accepted = np.arange(1, len(scores) + 1)[last_of_tie]
    coverage, risk = accepted / len(scores), errors / accepted
    return {"coverage": coverage, "risk": risk,
            "aurc": float(np.sum(np.diff(np.r_[0.0, coverage]) * risk))}
