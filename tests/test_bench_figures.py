"""The benchmarks' bookkeeping: machine kinds, the epoch profile and the ratios, against
hand-computed tables (the timings themselves live in bench/, never in tests)."""

import csv
import json

import numpy as np
import pytest

from bench import epoch_profile, machine, ratios, run_figures


@pytest.mark.parametrize("flags, gpus, kind", [
    (["avx2"], 0, "avx2"),
    (["avx2", "avx512f"], 0, "avx512"),
    (["avx2", "avx512f", "avx512_bf16"], 0, "avx512_bf16"),
    (["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"], 0, "amx"),
    (["avx2", "avx512f", "avx512_bf16"], 2, "gpu"),
    ([], 0, "other"),
])
def test_machine_kind(flags, gpus, kind):
    assert machine.kind({"flags": flags}, gpus=gpus) == kind
    assert kind in machine.KINDS


def test_results_are_kept_per_machine_kind(tmp_path):
    path = machine.results_path("serving", tmp_path)
    assert path == tmp_path / machine.kind() / "serving.json"


def _write_history(run_dir, rows):
    folder = run_dir / "train"
    folder.mkdir(parents=True)
    with open(folder / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_epoch_profile_splits_each_epoch(tmp_path):
    # 100 steps of median 50 ms = 5 s of steps; epoch 6 s of which 0.2 s test, 0.1 s monitor
    rows = [{"epoch": e, "steps": 100, "train_seconds": 5.4, "step_ms_median": 50.0,
             "test_seconds": 0.2, "monitor_seconds": 0.1, "checkpoint_seconds": 0.1,
             "seconds": 6.0} for e in (1, 2)]
    rows[1]["seconds"] = 7.5
    _write_history(tmp_path, rows)
    figures = epoch_profile.profile(tmp_path)
    first, second = figures["epochs"]
    assert figures["steps_per_epoch"] == 100
    assert first["epoch_over_steps"] == pytest.approx(6.0 / 5.0)
    assert second["epoch_over_steps"] == pytest.approx(7.5 / 5.0)
    assert first["train_over_steps"] == pytest.approx(5.4 / 5.0)
    assert first["watching_share"] == pytest.approx(0.3 / 6.0, abs=1e-4)
    assert first["other_share"] == pytest.approx(1 - 5.8 / 6.0, abs=1e-4)
    assert figures["median"]["epoch_over_steps"] == pytest.approx((1.2 + 1.5) / 2)


def test_epoch_profile_refuses_a_run_without_profiled_epochs(tmp_path):
    _write_history(tmp_path, [{"epoch": 1, "loss": 1.0, "seconds": 3.0}])
    with pytest.raises(ValueError, match="no profiled epoch"):
        epoch_profile.profile(tmp_path)


def test_ratios_of_a_run():
    results = {
        "training": {"rows": {
            "discriminative_float32": {"images_per_second": 100.0, "step_ms": 10.0},
            "sdim_concat_float32": {"images_per_second": 90.0, "step_ms": 11.0,
                                    "step_time_over_discriminative": 1.1},
            "discriminative_mixed_bfloat16": {"images_per_second": 130.0, "step_ms": 7.7},
            "sdim_concat_mixed_bfloat16": {"images_per_second": 117.0, "step_ms": 8.5,
                                           "step_time_over_discriminative": 1.104}}},
        "serving": {"rows": {"bare_forward": {"images_per_second_batch_256": 10.0},
                             "serving_default": {"throughput_over_bare_forward": 0.95,
                                                 "p50_latency_over_bare_forward": 1.1}}},
        "calibration": {"calibration_over_inference": 1.3}}
    assert ratios.ratios(results) == {
        "training.step_time.sdim_concat_float32_over_discriminative": 1.1,
        "training.step_time.sdim_concat_mixed_bfloat16_over_discriminative": 1.104,
        "training.images_per_second.discriminative.bf16_over_fp32": 1.3,
        "training.images_per_second.sdim_concat.bf16_over_fp32": 1.3,
        "serving.serving_default.throughput_over_bare_forward": 0.95,
        "serving.serving_default.p50_latency_over_bare_forward": 1.1,
        "calibration.calibration_over_inference": 1.3}


def _write_run(run_dir, accuracy, rejected, mnist_rejected, mnist_auroc, model="sdim"):
    (run_dir / "evaluate").mkdir(parents=True)
    (run_dir / "train").mkdir()
    # the evaluate stage names the top class score after the model's outputs
    top = {"sdim": "max_log_likelihood", "discriminative": "max_logit"}[model]
    report = {"model": model, "score": "feature_density", "accuracy": accuracy,
              "deployed_percentile": "conformal",
              "selective": {"conformal": {"reject_rate": rejected, "accuracy_left": 0.95}},
              "ood": {"mnist": {"decision_rejection_rate": {"conformal": mnist_rejected},
                                "separation": {top: {"auroc": mnist_auroc},
                                               "energy": {"auroc": 0.5}}}}}
    (run_dir / "evaluate" / "report.json").write_text(json.dumps(report))
    (run_dir / "train" / "state.json").write_text(json.dumps({"epoch": 10}))


def test_parity_of_a_run_against_the_spread_of_two(tmp_path):
    # percentage points: fp32 runs at 92.0 and 92.5 allow [91.7, 92.8] with 0.3 points.
    _write_run(tmp_path / "a", 0.920, 0.030, 0.95, 0.990)
    _write_run(tmp_path / "b", 0.925, 0.034, 0.96, 0.985)
    _write_run(tmp_path / "c", 0.929, 0.036, 0.94, 0.9885, model="discriminative")
    by_run = {name: run_figures.figures(tmp_path / name) for name in "abc"}
    assert by_run["a"]["test_accuracy"] == pytest.approx(92.0)
    assert by_run["a"]["mnist_auroc"] == pytest.approx(99.0)
    assert by_run["c"]["mnist_auroc"] == pytest.approx(98.85)  # max_logit, not energy
    checks = run_figures.parity(by_run, "c", 0.3)["checks"]
    assert checks["test_accuracy"]["allowed"] == pytest.approx([91.7, 92.8])
    assert not checks["test_accuracy"]["within"]  # 92.9 > 92.8
    assert checks["test_rejected"]["within"]  # 3.6 <= 3.4 + 0.3
    assert not checks["mnist_rejected"]["within"]  # 94.0 < 95.0 - 0.3
    assert checks["mnist_auroc"]["within"]  # 98.85 in [98.2, 99.3]
    assert not run_figures.parity(by_run, "c", 0.3)["all_within"]
    with pytest.raises(ValueError, match="at least two others"):
        run_figures.parity({"a": by_run["a"], "c": by_run["c"]}, "c", 0.3)
    with pytest.raises(FileNotFoundError, match="run the evaluate stage"):
        run_figures.figures(tmp_path / "missing")


def test_attack_figures_of_a_run_with_an_attacked_baseline(tmp_path):
    _write_run(tmp_path, 0.99, 0.05, 0.98, 0.995)
    report = {
        "clean": {"sdim": {"rejected": 0.054}, "discriminative": {"rejected": 0.031}},
        "adaptive": {
            "pgd_accepted_linf": {
                "sdim": {"epsilons": [0.05, 0.1], "undetected_success": [0.295, 0.79]},
                "discriminative": {"epsilons": [0.05, 0.1], "undetected_success": [0.5, 1.0]}},
            "pgd_accepted_l2": {"sdim": {
                "epsilons": [0.5, 1.0], "undetected_success": [0.025, 0.63],
                "median_distance_of_successes": 0.9963}},
            "cw_accepted": {"sdim": {"undetected_success": 154 / 180}}},
        "sanity": {"a_large_budget": {"passed": True},
                   "b_more_steps_and_restarts": {"passed": None}}}
    (tmp_path / "attack").mkdir()
    (tmp_path / "attack" / "attack_report.json").write_text(json.dumps(report))
    figures = run_figures.figures(tmp_path)
    assert figures["test_accuracy"] == pytest.approx(99.0)
    attack = {k: v for k, v in figures.items() if k.startswith("attack/")}
    assert attack == pytest.approx({
        "attack/sdim/clean_rejected": 5.4, "attack/discriminative/clean_rejected": 3.1,
        "attack/sdim/pgd_linf_undetected@0.05": 29.5, "attack/sdim/pgd_linf_undetected@0.1": 79.0,
        "attack/discriminative/pgd_linf_undetected@0.05": 50.0,
        "attack/discriminative/pgd_linf_undetected@0.1": 100.0,
        "attack/sdim/pgd_l2_undetected@0.5": 2.5, "attack/sdim/pgd_l2_undetected@1": 63.0,
        "attack/sdim/pgd_l2_median_distance": 0.9963,
        "attack/sdim/cw_accepted_undetected": 85.5556,
        "attack/sanity/a_large_budget": True, "attack/sanity/b_more_steps_and_restarts": None})
    assert figures["attack/sanity/a_large_budget"] is True


def test_decay_geometry_against_hand_computed_parts():
    from bench import whitened_parts
    # Three classes in 5 dimensions: means 0, 10 e0, 10 e1; each class's samples are its
    # mean +- a_i e_i, so the pooled covariance is diag(sigma^2) (a_i = sigma_i sqrt(5)),
    # up to the fit's ridge of 1e-6.
    sigma = np.array([2.0, 1.5, 1.0, 0.8, 0.5])
    means = np.array([np.zeros(5), 10 * np.eye(5)[0], 10 * np.eye(5)[1]])
    offsets = np.concatenate([np.diag(sigma * np.sqrt(5)), -np.diag(sigma * np.sqrt(5))])
    fit = np.concatenate([m + offsets for m in means])
    labels = np.repeat(np.arange(3), len(offsets))
    v = np.array([[0.4, -0.3, 1.0, 0.4, 0.2], [1.0, 0.5, -2.0, 1.6, 1.0],
                  [0.2, 0.1, 1.5, -0.2, 0.1]])
    result = whitened_parts.geometry(fit, labels, {"held": v[2:] + means[0],
                                                   "probe": v[:2] + means[0]}, 3, top_share=0.2)
    variances = sigma ** 2
    assert result["dim"] == 5
    assert result["effective_dim"] == pytest.approx(variances.sum() ** 2
                                                    / (variances ** 2).sum(), rel=1e-4)
    # whitened class means 0, 5 e0, (10 / 1.5) e1: centred, their squared lengths averaged
    whitened = np.array([[0, 0], [5, 0], [0, 10 / 1.5]])
    assert result["class_mean_spread"] == pytest.approx(
        ((whitened - whitened.mean(0)) ** 2).sum(1).mean(), rel=1e-4)
    probe = result["sets"]["probe"]
    z = v[:2] / sigma  # whitened deviations from class 0, the nearest
    between, rest = (z[:, :2] ** 2).sum(1), (z[:, 2:] ** 2).sum(1)
    assert probe["median_between"] == pytest.approx(np.median(between), rel=1e-4)
    assert probe["median_rest"] == pytest.approx(np.median(rest), rel=1e-4)
    assert probe["median_full"] == pytest.approx(np.median(between + rest), rel=1e-4)
    split = (between - 2) / 2 + (rest - 3) / np.sqrt(6)
    assert probe["median_split"] == pytest.approx(np.median(split), rel=1e-4)
    assert probe["median_most_variance"] == pytest.approx(np.median(z[:, 0] ** 2), rel=1e-4)
    least = (z[:, 2:] ** 2).mean(1)  # the three directions of least variance: e2, e3, e4
    assert probe["median_least_variance"] == pytest.approx(np.median(least), rel=1e-4)
    # the held-out image: rest 2.35 lies between the probes' 1.41 and 12, between 0.014 below
    assert probe["auroc_rest"] == probe["auroc_full"] == 0.5
    assert probe["auroc_between"] == 1.0
    assert "auroc_full" not in result["sets"]["held"]


def test_a_run_with_an_ambiguity_threshold_reports_both_refusals(tmp_path):
    _write_run(tmp_path, 0.92, 0.03, 0.95, 0.99)
    path = tmp_path / "evaluate" / "report.json"
    report = json.loads(path.read_text())
    report.update(min_gap=2.5, deployed={
        "test": {"rejected": 0.21, "ambiguous": 0.18, "accuracy_on_accepted": 0.985},
        "ood": {"mnist": {"rejected": 0.97}}})
    path.write_text(json.dumps(report))
    figures = run_figures.figures(tmp_path)
    assert figures["test_rejected"] == pytest.approx(21.0)  # not the thresholds' 3.0
    assert figures["test_ambiguous"] == pytest.approx(18.0)
    assert figures["accuracy_on_accepted"] == pytest.approx(98.5)
    assert figures["mnist_rejected"] == figures["ood_rejected/mnist"] == pytest.approx(97.0)
