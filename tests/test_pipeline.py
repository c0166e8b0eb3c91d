"""The runner and the train stage: outputs, manifests, skipping, resume, bad input."""

import os
import pathlib
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline import artifacts, faults, run
from pipeline.config import ConfigError, PipelineConfig
from pipeline.run_dir import Run, TrainedModel
from pipeline.stages import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


DEFAULT_STAGES = [s.name for s in run.STAGES if s.default]


def test_tiny_run_writes_every_output(tiny_run):
    config, run_dir = tiny_run
    assert not (run_dir / "attack").exists()  # opt-in
    for stage in DEFAULT_STAGES:
        manifest = artifacts.read_json(run_dir / stage / artifacts.MANIFEST)
        assert manifest["stage"] == stage and manifest["versions"]["tensorflow"].startswith("2.")
        for output in manifest["outputs"]:
            assert (run_dir / stage / output).exists(), output
    assert set(artifacts.read_json(run_dir / "train" / artifacts.MANIFEST)["inputs"]) == {
        "ingest"}
    rows = Run(run_dir).model.history()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) >= {"loss", "mi_loss", "nll_loss", "lm_loss", "accuracy",
                            "test_accuracy", "seconds"}
    row = rows[-1]
    np.testing.assert_allclose(row["loss"], row["mi_loss"] + row["nll_loss"] + row["lm_loss"],
                               rtol=1e-4)
    readme = (run_dir / "README.md").read_text()
    assert "checkpoints/best.keras" in readme
    for stage in DEFAULT_STAGES:
        assert f"[{stage}]({stage}/)" in readme
    assert any((run_dir / "train" / "logs" / "train").iterdir())  # TensorBoard events


def test_best_checkpoint_gives_the_logged_test_accuracy(tiny_run, data_dir):
    from sdim_tf import data

    _, run_dir = tiny_run
    model = Run(run_dir).model.best()
    images, labels = data.load_split("fashion_mnist", "test", data_dir=str(data_dir))
    logits = model.predict(data.preprocess(images[:2000]), batch_size=500, verbose=0)
    assert logits.shape == (2000, 10)
    accuracy = (np.argmax(logits, 1) == labels[:2000]).mean()
    rows = Run(run_dir).model.history()
    best = min(rows, key=lambda r: r["loss"])  # the paper keeps the minimum training loss
    logged = best["test_accuracy"]
    assert abs(accuracy - logged) < 0.03  # 2000 of the 10000 test images
    assert accuracy > 0.2  # 16 steps on 1024 images: twice chance (0.1)


def test_unchanged_stage_is_skipped_and_changed_flag_reruns(tiny_run):
    config, run_dir = tiny_run
    before = {s: artifacts.read_json(run_dir / s / artifacts.MANIFEST)["finished"]
              for s in ("ingest", "train")}
    run.run(config)
    after = {s: artifacts.read_json(run_dir / s / artifacts.MANIFEST)["finished"]
             for s in ("ingest", "train")}
    assert after == before
    import dataclasses

    other = dataclasses.replace(config, run_dir=str(run_dir.parent / "other"))
    import shutil

    shutil.copytree(run_dir, other.run_dir)
    changed = dataclasses.replace(other, margin=5.0, epochs=1, stages=("ingest", "train"))
    run.run(changed)
    manifests = {s: artifacts.read_json(pathlib.Path(other.run_dir) / s / artifacts.MANIFEST)
                 for s in ("ingest", "train")}
    assert manifests["ingest"]["finished"] == before["ingest"]
    assert manifests["train"]["finished"] != before["train"]
    assert manifests["train"]["config"]["margin"] == 5.0


def test_nan_guard_keeps_the_last_good_checkpoint(tiny_run, monkeypatch):
    import dataclasses
    import shutil

    config, run_dir = tiny_run
    copy = run_dir.parent / "nan"
    shutil.copytree(run_dir, copy)
    good = (copy / "train" / train.LAST).read_bytes()
    monkeypatch.setattr(train, "run_epoch", lambda *a, **k: {"loss": float("nan")})
    with pytest.raises(train.TrainingError, match=r"diverged in epoch 3 .*epoch 2"):
        run.run(dataclasses.replace(config, run_dir=str(copy), epochs=3))
    assert (copy / "train" / train.LAST).read_bytes() == good
    assert artifacts.read_json(copy / "train" / train.STATE)["epoch"] == 2
    assert not (copy / "train" / artifacts.MANIFEST).exists()


def test_config_errors():
    with pytest.raises(ConfigError, match="--dataset: unknown dataset 'imagenet'"):
        PipelineConfig(dataset="imagenet").resolve()
    with pytest.raises(ConfigError, match=r"--train_limit=64 is smaller than one batch"):
        PipelineConfig(train_limit=64).resolve()
    with pytest.raises(ConfigError, match=r"--stages: unknown \['deploy'\]"):
        PipelineConfig(stages=("deploy",)).resolve(run.STAGE_NAMES)
    with pytest.raises(ConfigError, match="--batch_size must be >= 2"):
        PipelineConfig(batch_size=1).resolve()
    with pytest.raises(ConfigError, match="--score must be one of model, feature_density"):
        PipelineConfig(score="energy").resolve()
    with pytest.raises(ConfigError, match=r"--density_layers must be a non-empty subset"):
        PipelineConfig(density_layers=("stage5",)).resolve()
    with pytest.raises(ConfigError, match="--threshold_rule must be one of per_class, shared"):
        PipelineConfig(threshold_rule="global").resolve()
    assert PipelineConfig(score="model").resolve().threshold_rule == "per_class"
    with pytest.raises(ConfigError, match=r"--reject_budget must lie in \[0, 1\)"):
        PipelineConfig(reject_budget=4.0).resolve()
    with pytest.raises(ConfigError, match="--export_percentile=5 is not among"):
        PipelineConfig(reject_budget=0, export_percentile=5).resolve()
    assert PipelineConfig(dataset="cifar10").resolve().n == 3
    assert PipelineConfig(model="discriminative").resolve().run_dir.endswith(
        "fashion_mnist-discriminative")


def _assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in last, last


def test_cli_user_errors_are_one_line(tmp_path, tiny_run, data_dir):
    _, run_dir = tiny_run
    _assert_one_line_error(_cli(["--dataset=imagenet"], tmp_path), "unknown dataset")
    _assert_one_line_error(_cli(["--train_limit=10"], tmp_path), "--train_limit")
    (tmp_path / "file").write_text("")
    _assert_one_line_error(_cli([f"--run_dir={tmp_path / 'file' / 'run'}"], tmp_path),
                           "not writable")
    _assert_one_line_error(_cli(["--stages=train", f"--run_dir={tmp_path / 'r'}"], tmp_path),
                           "needs the outputs of ingest")
    # A corrupt checkpoint: the resume path names it.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "train" / train.LAST).write_bytes(b"garbage")
    result = _cli([f"--run_dir={broken}", "--epochs=3", "--train_limit=1024",
                   f"--data_dir={data_dir}"], tmp_path)
    _assert_one_line_error(result, "last.keras cannot be loaded")


def test_killed_training_resumes(tmp_path, tiny_run):
    import shutil

    _, run_dir = tiny_run
    work = tmp_path / "run"
    work.mkdir()
    shutil.copytree(run_dir / "ingest", work / "ingest")  # reuse the ingested data
    args = [f"--run_dir={work}", "--stages=ingest,train", "--epochs=3", "--train_limit=256",
            "--batch_size=64"]
    # Killed right after epoch 1's state is written: the same point on any machine.
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2",
               **{faults.ENV: "train.epoch_done:1"})
    killed = subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=tmp_path,
                            env=env, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = work / "train" / train.STATE
    done = artifacts.read_json(state)["epoch"]
    assert done == 1
    assert not (work / "train" / artifacts.MANIFEST).exists()
    result = _cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after epoch {done} of 3" in result.stderr
    assert [r["epoch"] for r in TrainedModel(work / "train").history()] == [1, 2, 3]
    final = keras.models.load_model(work / "train" / train.LAST)
    assert int(final.optimizer.iterations) == 3 * (256 // 64)  # no step lost or repeated


def test_calibrate_and_evaluate_outputs(tiny_run):
    from pipeline.run_dir import Calibration, Evaluation
    from sdim_tf import rejection

    config, run_dir = tiny_run
    config = config.resolve()  # the presets the run applied
    run_view = Run(run_dir)
    saved = artifacts.read_json(run_dir / "calibrate" / Calibration.THRESHOLDS)
    # The preset holds out the last 5000 training images for calibration.
    assert config.validation_split == 5000
    assert saved["source"] == "validation" and saved["examples"] == {
        "skip": 55000, "limit": 5000, "num_samples": 5000}
    assert saved["score"] == "feature_density"  # the default
    # The fitted densities are numpy's class means and pooled covariance of the features
    # of the 1024 trained images (no augmentation).
    images, train_labels = run_view.examples.arrays("train", limit=1024)
    features = run_view.model.best().encoder.features(images, training=False)
    parameters = np.load(run_dir / "calibrate" / Calibration.DENSITY)
    for layer in saved["density_layers"]:
        x = features[layer].numpy().astype(np.float64)
        means = np.stack([x[train_labels == c].mean(0) for c in range(10)])
        np.testing.assert_allclose(parameters[f"{layer}/means"], means, rtol=1e-3,
                                   atol=1e-4 * np.abs(means).max())
        covariance = np.cov((x - means[train_labels]).T, bias=True)
        factor = parameters[f"{layer}/precision_factor"].astype(np.float64)
        inverse = np.linalg.inv(factor)
        recovered = inverse.T @ inverse  # (L L^T)^-1 = covariance + ridge
        np.testing.assert_allclose(recovered, covariance, rtol=1e-2,
                                   atol=1e-3 * np.abs(covariance).max())
    # Independent recomputation from the deployed scores on the same images.
    model = run_view.scoring_model()
    ll, labels = rejection.class_scores(model, run_view.examples.dataset("train", 55000, 5000))
    # The deployed percentile is the last 0.05 step that keeps within --reject_budget.
    # The default rule for feature_density: one threshold, over every correct sample.
    assert saved["threshold_rule"] == config.threshold_rule == "shared"
    correct = ll.argmax(1) == labels
    deployed = float(saved["deployed"]["percentile"])
    for p, within in ((deployed, True), (deployed + 0.05, False)):
        ordered = np.sort(ll.max(1)[correct])
        threshold = ordered[int(np.floor(p / 100 * len(ordered)))]
        rate = (ll.max(1) < threshold).mean()
        assert (rate <= config.reject_budget) == within, (p, rate)
    for p in ("1", "2"):
        ordered = np.sort(ll.max(1)[correct])
        expected = ordered[int(np.floor(int(p) / 100 * len(ordered)))]
        np.testing.assert_allclose(saved["percentiles"][p]["thresholds"], [expected] * 10,
                                   rtol=1e-3)
    report = artifacts.read_json(run_dir / "evaluate" / Evaluation.REPORT_JSON)
    assert set(report["ood"]) == {"mnist", "uniform_noise", "gaussian_noise", "constant"}
    test_ll, test_labels = rejection.class_scores(model, run_view.examples.dataset("test"))
    assert report["accuracy"] == pytest.approx((test_ll.argmax(1) == test_labels).mean())
    thresholds = rejection.from_json(saved["percentiles"])[1]["thresholds"]
    rejected = (test_ll.max(1) < thresholds[test_ll.argmax(1)]).mean()
    assert report["selective"]["1"]["reject_rate"] == pytest.approx(rejected)
    md = (run_dir / "evaluate" / Evaluation.REPORT_MD).read_text()
    for table in ("Table 1", "Table 2", "Table 3", "What this means"):
        assert table in md
    for figure in report["figures"]:
        import matplotlib.image

        assert matplotlib.image.imread(run_dir / "evaluate" / figure).shape[0] > 100
