"""Concurrent load on one SavedModel version (bench/concurrent_load.py, few calls): 8
threads of one process, then 2 TensorFlow-only processes, answer a seeded mix of valid and
invalid requests exactly as the same requests were answered alone."""

from __future__ import annotations

import numpy as np
import pytest

from bench import concurrent_load, untrained

CALLS = 32


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return untrained.export(tmp_path_factory.mktemp("concurrency"), "load")[0]


def test_the_request_mix_is_seeded_and_covers_every_kind():
    made = concurrent_load.requests(CALLS, seed=1)
    assert concurrent_load.digest(made) == concurrent_load.digest(
        concurrent_load.requests(CALLS, seed=1))
    assert concurrent_load.digest(made) != concurrent_load.digest(
        concurrent_load.requests(CALLS, seed=2))
    assert {name for name, _ in made} == {"serving_default", "classify_raw", "classify_encoded"}
    assert all(1 <= len(images) <= 64 for _, images in made)
    floats = np.concatenate([x.reshape(len(x), -1) for name, x in made
                             if name == "serving_default" and x.shape[1:] == (32, 32, 1)])
    assert np.isnan(floats).any() and np.isinf(floats).any() and (floats > 1).any()


def test_answers_under_load_equal_the_answers_alone(saved_model):
    figures = concurrent_load.measure(saved_model, CALLS, seed=1, threads=8, processes=2)
    # the mix reached every refusal reason, and whole-request refusals
    assert set(figures["rows_by_reason"]) >= {
        "non_finite", "out_of_range", "not_png_or_jpeg", "bad_header", "too_large"}
    assert figures["refused_requests"] > 0
    threads = figures["in_threads"]
    assert threads["calls"] == CALLS and threads["mismatches"] == 0, threads
    assert threads["refused_calls"] == figures["refused_requests"]
    assert abs(threads["rss_mib"]["second_half_drift"]) <= concurrent_load.RSS_DRIFT
    workers = figures["in_processes"]["workers"]
    assert len(workers) == 2
    for worker in workers:
        assert worker["calls"] == CALLS and worker["mismatches"] == 0, worker
        assert worker["imported"] == []  # TensorFlow only
        assert abs(worker["rss_mib"]["second_half_drift"]) <= concurrent_load.RSS_DRIFT
    assert threads["latency_ms"]["p50"] <= threads["latency_ms"]["p99"]


def test_a_different_answer_is_caught():
    answer = {"class_ids": np.array([3, 1]), "rejected": np.array([False, True]),
              "reason": np.array([b"", b"non_finite"]),
              "class_scores": np.array([[1.0, -np.inf], [2.0, -np.inf]], np.float32)}
    same = {k: v.copy() for k, v in answer.items()}
    same["class_scores"][0, 0] += 1e-6  # within the tolerance
    assert concurrent_load.difference(same, answer) is None
    for key, value in (("class_ids", np.array([3, 2])), ("rejected", np.array([True, True])),
                       ("reason", np.array([b"", b"out_of_range"])),
                       ("class_scores", np.array([[1.001, -np.inf], [2.0, -np.inf]]))):
        assert key in concurrent_load.difference({**answer, key: value}, answer)
    refusal = "InvalidArgumentError: assertion failed: [serving_default: images must be ...]"
    assert concurrent_load.difference(refusal, refusal) is None
    assert concurrent_load.difference(refusal, answer) is not None
    assert concurrent_load.difference(refusal + " [x]", refusal) is not None
