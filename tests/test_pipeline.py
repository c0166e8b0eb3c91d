"""The runner and the train stage: outputs, manifests, skipping, resume, bad input."""

import os
import pathlib
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline import artifacts, faults, run, sections, summary
from pipeline.config import ConfigError, PipelineConfig
from pipeline.run_dir import Run, TrainedModel
from pipeline.stages import train
from sdim_tf import monitoring

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


def test_the_closing_lines_and_the_run_readme_lead_with_the_figures(tiny_run):
    """The headline figures against the test scores evaluate kept, decided by hand."""
    config, run_dir = tiny_run
    with np.load(run_dir / "evaluate" / "parts" / "test.npz") as kept:
        scores, labels = kept["scores"], kept["labels"]
    _, thresholds = Run(run_dir).calibration.deployed()
    predicted = scores.argmax(1)
    rejected = ~(scores.max(1) >= thresholds[predicted])
    wrong = predicted != labels
    report = artifacts.read_json(run_dir / "evaluate" / "report.json")
    export = artifacts.read_json(run_dir / "export" / "export.json")
    mnist = report["ood"]["mnist"]
    figures = dict(summary.headline(run_dir))
    assert figures["test accuracy"] == f"{100 * (~wrong).mean():.2f}% of 10000 test images"
    assert figures["test images rejected"] == f"{100 * rejected.mean():.2f}%"
    assert figures["right among the accepted"] == f"{100 * (~wrong[~rejected]).mean():.2f}%"
    assert figures["silent error"] == (f"{100 * (wrong & ~rejected).mean():.2f}% (accepted and "
                                       "wrong, a share of all test images)")
    assert figures["promise"] == report["promises"]["unfamiliar"] and "%" in figures["promise"]
    assert "promise (ambiguous)" not in figures  # no --max_error
    assert figures["mnist rejected / AUROC"].startswith(
        f"{100 * mnist['decision_rejection_rate'][str(report['deployed_percentile'])]:.2f}% / "
        f"{mnist['separation']['max_log_likelihood']['auroc']:.4f} (10000 images never seen")
    assert figures["silent error, corrupted"].startswith(
        f"{100 * report['shifts']['mean_silent_error_middle']:.2f}% (11 corruptions at "
        "severity 3, first 200 test images)")
    assert figures["SavedModel"] == f"{export['path']} (version {export['version']})"
    closing = run.closing(run_dir, 581.2).splitlines()
    assert closing[0] == f"Run finished in 9 min 41 s; its report: {run_dir / 'README.md'}"
    assert [line.split("  ", 2)[1].strip() for line in closing[1:]] == list(figures)
    assert all(line.endswith(value) for line, value in zip(closing[1:], figures.values(),
                                                           strict=True))
    readme = (run_dir / "README.md").read_text().splitlines()
    assert readme[2:4] == ["| figure | value |", "|---|---|"]
    assert readme[4:4 + len(figures)] == [f"| {k} | {v} |" for k, v in figures.items()]
    assert readme[5 + len(figures)] == (
        f"Command: `python -m pipeline.run --dataset=fashion_mnist "
        f"--data_dir={config.data.data_dir} --epochs=2 --lr_schedule=constant "
        f"--train_limit=1024 --max_error=0 --shift_images=200 --run_dir={run_dir}`")


def test_best_checkpoint_gives_the_logged_test_accuracy(tiny_run, data_dir):
    from sdim_tf import data

    _, run_dir = tiny_run
    model = Run(run_dir).model.best()
    images, labels = data.load_split("fashion_mnist", "test", data_dir=str(data_dir))
    n = train.TEST_SUBSET  # what each epoch's test_accuracy is measured on
    logits = model.predict(data.preprocess(images[:n]), batch_size=500, verbose=0)
    assert logits.shape == (n, 10)
    accuracy = (np.argmax(logits, 1) == labels[:n]).mean()
    rows = Run(run_dir).model.history()
    best = min(rows, key=lambda r: r["loss"])  # the paper keeps the minimum training loss
    logged = best["test_accuracy"]
    assert abs(accuracy - logged) < 0.03  # float32 here, the training precision there
    assert accuracy > 0.2  # 16 steps on 1024 images: twice chance (0.1)


def _accuracy_and_ties(log_likelihoods, labels, precision):
    """Accuracy, and the share of images whose two top classes lie within the training
    precision's rounding of each other (bf16 keeps 8 bits): a forward pass batched otherwise
    may break those ties the other way."""
    top2 = np.sort(log_likelihoods, axis=1)[:, -2:]
    rounding = 1e-5 if precision == "float32" else 2.0 ** -8
    ties = (top2[:, 1] - top2[:, 0]) <= rounding * np.maximum(1.0, np.abs(top2[:, 1]))
    return (log_likelihoods.argmax(1) == labels).mean(), ties.mean()


def test_history_watches_rejection_on_held_out_images(tiny_run):
    """Each epoch's row holds the rejection quality on the held-out images (the last 5000
    training images): its accuracy is the last checkpoint's on the first 1000 of them."""
    _, run_dir = tiny_run
    view = Run(run_dir)
    rows = view.model.history()
    last = keras.models.load_model(view.model.last_path)
    precision = view.model.state()["precision"]
    held_out, labels = view.examples.arrays("train", skip=55000, limit=1000)
    accuracy, ties = _accuracy_and_ties(last.predict(held_out, verbose=0), labels, precision)
    assert abs(rows[-1]["monitor/model/accuracy"] - accuracy) <= ties + 1e-9
    test, test_labels = view.examples.arrays("test")
    full, ties = _accuracy_and_ties(last.predict(test, verbose=0), test_labels, precision)
    assert abs(rows[-1]["test_accuracy_full"] - full) <= ties + 1e-9
    assert "test_accuracy_full" not in rows[0]  # only after the last epoch
    for row in rows:
        for score in ("model", monitoring.score_name(monitoring.layer_set())):
            assert 0 <= row[f"monitor/{score}/rejected"] <= 0.04  # the reject budget
            assert 0 <= row[f"monitor/{score}/mean_outlier_auroc"] <= 1
        assert row["monitor_seconds"] > 0 and row["test_seconds"] > 0


def test_unchanged_stage_is_skipped_and_changed_flag_reruns(tiny_run):
    config, run_dir = tiny_run
    before = {s: artifacts.read_json(run_dir / s / artifacts.MANIFEST)["finished"]
              for s in ("ingest", "train")}
    run.run(config)
    after = {s: artifacts.read_json(run_dir / s / artifacts.MANIFEST)["finished"]
             for s in ("ingest", "train")}
    assert after == before

    other = config.replace(run_dir=str(run_dir.parent / "other"))
    import shutil

    shutil.copytree(run_dir, other.run_dir)
    changed = other.replace(margin=5.0, epochs=1, stages=("ingest", "train"))
    run.run(changed)
    manifests = {s: artifacts.read_json(pathlib.Path(other.run_dir) / s / artifacts.MANIFEST)
                 for s in ("ingest", "train")}
    assert manifests["ingest"]["finished"] == before["ingest"]
    assert manifests["train"]["finished"] != before["train"]
    assert manifests["train"]["config"]["margin"] == 5.0


def test_changed_outputs_are_rerun_or_named(tiny_run, tmp_path):
    """Manifests record each output's sha256: an edited thresholds.json is recomputed, a
    changed checkpoint or a truncated shard is a one-line error naming the file."""
    import shutil

    from pipeline.run_dir import ArtifactError

    config, run_dir = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = config.replace(run_dir=str(copy), stages=("calibrate",))
    thresholds = copy / "calibrate" / "thresholds.json"
    original = thresholds.read_text()
    thresholds.write_text(original.replace('"threshold_rule"', '"edited": 1, "threshold_rule"'))
    run.run(config)
    assert thresholds.read_text() == original  # rerun, not trusted
    best = copy / "train" / TrainedModel.BEST
    content = bytearray(best.read_bytes())
    content[len(content) // 2] ^= 0xFF
    best.write_bytes(bytes(content))
    with pytest.raises(ArtifactError, match=r"best\.keras changed since train wrote it"):
        run.run(config)  # calibrate reads the checkpoint: named, never used
    with pytest.raises(ArtifactError, match=r"best\.keras changed since train wrote it"):
        run.run(config.replace(stages=("train",)))  # not silently retrained
    shard = sorted((copy / "ingest").glob("test-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=shard.name):
        run.run(config.replace(stages=("train",)))


def test_nan_guard_keeps_the_last_good_checkpoint(tiny_run, monkeypatch):
    import shutil

    config, run_dir = tiny_run
    copy = run_dir.parent / "nan"
    shutil.copytree(run_dir, copy)
    good = (copy / "train" / TrainedModel.LAST).read_bytes()
    monkeypatch.setattr(train, "run_epoch", lambda *a, **k: {"loss": float("nan")})
    with pytest.raises(train.TrainingError, match=r"diverged in epoch 3 .*epoch 2"):
        run.run(config.replace(run_dir=str(copy), epochs=3))
    assert (copy / "train" / TrainedModel.LAST).read_bytes() == good
    assert artifacts.read_json(copy / "train" / TrainedModel.STATE)["epoch"] == 2
    assert not (copy / "train" / artifacts.MANIFEST).exists()


def test_collapse_guard_stops_a_finite_divergence(tiny_run, monkeypatch):
    """An outlier-term run at weight 1: accuracy 0.90 in epoch 9, 0.19 in epoch 10, loss 1e8."""
    import shutil

    config, run_dir = tiny_run
    copy = run_dir.parent / "collapse"
    shutil.copytree(run_dir, copy)
    epochs = iter([{"loss": 4.77, "accuracy": 0.9022}, {"loss": 1.1e8, "accuracy": 0.1896}])
    monkeypatch.setattr(train, "run_epoch", lambda *a, **k: next(epochs))
    with pytest.raises(train.TrainingError,
                       match=r"diverged in epoch 4 \(train accuracy 0\.190 against 0\.902 in "
                             r"epoch 3 .*last good checkpoint \(epoch 3\)"):
        run.run(config.replace(run_dir=str(copy), epochs=4))
    assert artifacts.read_json(copy / "train" / TrainedModel.STATE)["epoch"] == 3


@pytest.mark.parametrize("accuracies, now, diverged", [
    ([0.68, 0.81, 0.90], 0.19, True),    # the diverged run: to twice chance (0.2) or below
    ([0.68, 0.81, 0.90], 0.21, False),   # above twice chance: a bad epoch, not a collapse
    ([0.25, 0.30], 0.12, False),         # never learned (a smoke run): nothing to lose
    ([0.50], 0.20, True),                # the edges: learned at 0.5, at 2/C
    ([], 0.05, False),                   # the first epoch
])
def test_collapse_by_hand(accuracies, now, diverged, num_classes=10):
    history = [{"epoch": e + 1, "accuracy": a} for e, a in enumerate(accuracies)]
    why = train.collapse(history, {"loss": 1.0, "accuracy": now}, num_classes=num_classes)
    assert (why is not None) == diverged
    if diverged:
        best = max(accuracies)
        assert why.startswith(f"train accuracy {now:.3f} against {best:.3f} in epoch "
                              f"{accuracies.index(best) + 1}")


@pytest.mark.parametrize("accuracies, now, diverged", [
    ([0.868], 0.988, False),      # learning on: never a collapse (twice chance is 1.0)
    ([0.70], 0.55, False),        # never clearly learned: best below 0.75
    ([0.80, 0.90], 0.71, False),  # above halfway back to chance, (0.5 + 0.9) / 2 = 0.70
    ([0.80, 0.90], 0.70, True),   # at it
])
def test_collapse_by_hand_two_classes(accuracies, now, diverged):
    test_collapse_by_hand(accuracies, now, diverged, num_classes=2)


def test_zero_epochs_keep_the_untrained_network(tiny_run):
    """--epochs=0: the seed's initial weights are the model, and calibrate takes them."""
    import shutil

    config, run_dir = tiny_run
    copy = run_dir.parent / "untrained"
    shutil.copytree(run_dir, copy)
    zero = config.replace(run_dir=str(copy), epochs=0, stages=("ingest", "train", "calibrate"))
    run.run(zero)
    state = artifacts.read_json(copy / "train" / TrainedModel.STATE)
    assert state["epoch"] == 0 and state["history"] == []
    keras.utils.set_random_seed(config.train.seed)
    resolved = zero.resolve(run.STAGE_NAMES)
    fresh = train.build_model(resolved.model, resolved.train, 10, 1)
    saved = keras.models.load_model(copy / "train" / TrainedModel.BEST, compile=False)
    assert len(saved.weights) == len(fresh.weights)
    for got, want in zip(saved.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.path)
    best = (copy / "train" / TrainedModel.BEST).read_bytes()
    assert (copy / "train" / TrainedModel.LAST).read_bytes() == best
    thresholds = artifacts.read_json(copy / "calibrate" / "thresholds.json")
    assert thresholds["deployed"]["percentile"] == "conformal"
    with pytest.raises(ConfigError, match="--epochs must be >= 0"):
        PipelineConfig.from_flat(epochs=-1).resolve()


def test_config_errors():
    with pytest.raises(ConfigError, match="--dataset: unknown dataset 'imagenet'"):
        PipelineConfig.from_flat(dataset="imagenet").resolve()
    with pytest.raises(ConfigError, match=r"--train_limit must be >= 2, got 1"):
        PipelineConfig.from_flat(train_limit=1).resolve()
    with pytest.raises(ConfigError, match=r"--stages: unknown \['deploy'\]"):
        PipelineConfig.from_flat(stages=("deploy",)).resolve(run.STAGE_NAMES)
    with pytest.raises(ConfigError, match="--batch_size must be >= 2"):
        PipelineConfig.from_flat(batch_size=1).resolve()
    with pytest.raises(ConfigError, match="--score must be one of feature_density, model"):
        PipelineConfig.from_flat(score="energy").resolve()
    with pytest.raises(ConfigError, match=r"--density_layers must be a non-empty subset"):
        PipelineConfig.from_flat(density_layers=("stage5",)).resolve()
    with pytest.raises(ConfigError, match="--threshold_rule must be one of per_class, shared"):
        PipelineConfig.from_flat(threshold_rule="global").resolve()
    assert PipelineConfig.from_flat(score="model").resolve().calibrate.threshold_rule == "per_class"
    with pytest.raises(ConfigError, match=r"--reject_budget must lie in \[0, 1\)"):
        PipelineConfig.from_flat(reject_budget=4.0).resolve()
    with pytest.raises(ConfigError, match="--export_percentile=5 is not among"):
        PipelineConfig.from_flat(reject_budget=0, export_percentile=5).resolve()
    # the guarantee needs held-out images: said, with how many (1 - 0.96^74 >= 0.95)
    with pytest.raises(ConfigError, match=r"^--reject_budget=0.04 promises its rate .* "
                       r"--validation_split=N \(at least 74 images\)"):
        PipelineConfig.from_flat(validation_split=0).resolve()
    # both promises asked for: twice the 525 images the error promise needs (each rule on its
    # half); the preset's error promise is left out when nothing is held out
    with pytest.raises(ConfigError, match=r"^--reject_budget=0.04 and --max_error=0.02 promise "
                       r"their rates .* \(at least 1050 images\), --validation_fraction or "
                       r"--reject_budget=0 --max_error=0 "):
        PipelineConfig.from_flat(validation_split=0, max_error=0.02).resolve()
    assert PipelineConfig.from_flat(validation_split=0, reject_budget=0).resolve() \
        .calibrate.max_error == 0
    assert PipelineConfig.from_flat(dataset="image_folder").resolve().calibrate.reject_budget \
        == 0.04  # on the held-out share of each class
    with pytest.raises(ConfigError, match=r"--reject_confidence must lie in \[0, 1\)"):
        PipelineConfig.from_flat(reject_confidence=1.0).resolve()
    # the second refusal: on for the named datasets, required only when asked for; off for
    # image folders; its promise needs held-out images too
    calibrate = PipelineConfig.from_flat().resolve().calibrate
    assert (calibrate.max_error, calibrate.max_error_required, calibrate.unfamiliar_rule) == (
        0.02, False, "conformal")
    assert PipelineConfig.from_flat(max_error=0.02).resolve().calibrate.max_error_required
    assert PipelineConfig.from_flat(dataset="image_folder").resolve().calibrate.max_error == 0
    assert PipelineConfig.from_flat(dataset="image_folder").resolve().calibrate \
        .unfamiliar_rule == "conformal"  # the held-out share of each class carries a budget
    assert PipelineConfig.from_flat(reject_budget=0).resolve().calibrate \
        .unfamiliar_rule == "percentile"
    with pytest.raises(ConfigError, match=r"--max_error must lie in \[0, 1\)"):
        PipelineConfig.from_flat(max_error=1.5).resolve()
    with pytest.raises(ConfigError, match=r"^--max_error=0.05 promises its rate on held-out "
                       r"images: pass --validation_split=N \(at least 394 images\), "
                       r"--validation_fraction or --max_error=0$"):
        PipelineConfig.from_flat(max_error=0.05, validation_split=0, reject_budget=0).resolve()
    with pytest.raises(ConfigError, match="--unfamiliar_rule=conformal needs --reject_budget"):
        PipelineConfig.from_flat(unfamiliar_rule="conformal", reject_budget=0).resolve()
    with pytest.raises(ConfigError, match="--unfamiliar_rule must be one of conformal, "
                                          "percentile"):
        PipelineConfig.from_flat(unfamiliar_rule="median").resolve()
    assert PipelineConfig.from_flat(dataset="cifar10").resolve().model.n == 3
    assert PipelineConfig.from_flat(model="discriminative").resolve().run_dir.endswith(
        "fashion_mnist-discriminative")


def test_each_flag_keys_the_stages_that_read_it():
    """Every flag but the run-level ones and those that only say how to compute (XLA, the
    strategy) is in the cache key of the stages whose sections hold it, and only of those."""
    config = PipelineConfig.from_flat().resolve(run.STAGE_NAMES)
    owners = {}
    for stage in run.STAGES:
        for name in run.stage_settings(stage, config):
            owners.setdefault(name, []).append(stage.name)
    flags = {leaf.name for leaf in sections.leaves(PipelineConfig)}
    assert set(owners) == flags - {"run_dir", "stages", "force", "jit_compile", "distribute",
                                   "export_subset", "force_export"}
    assert owners["dataset"] == owners["data_dir"] == ["ingest", "evaluate", "explain"]
    assert owners["margin"] == owners["seed"] == owners["validation_split"] == \
        owners["validation_fraction"] == ["train"]
    assert owners["score"] == owners["reject_budget"] == owners["percentiles"] == ["calibrate"]
    assert owners["shift_images"] == ["evaluate"]
    assert owners["export_dir"] == owners["model_name"] == owners["max_batch"] == ["export"]
    assert owners["attack_images"] == owners["attack_baseline"] == ["attack"]


def _assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for word in words:
        assert word in last, last


def test_help_lists_the_flags_by_stage_and_the_attack_flags_under_helpfull(tmp_path):
    short = _cli(["--help"], tmp_path).stdout
    titles = ("Data", "Model", "Training", "Rejection", "Evaluation", "Export", "Run")
    where = [short.index(f"\n{title}:\n") for title in titles]
    assert where == sorted(where)
    flags = ("--dataset:", "--model:", "--epochs:", "--score:", "--shift_images:",
             "--max_batch:", "--force:")  # one of each group, in its group
    assert [short.index(f) for f in flags] == sorted(short.index(f) for f in flags)
    assert all(where[i] < short.index(f) < (where + [len(short)])[i + 1]
               for i, f in enumerate(flags))
    assert "--attack" not in short.replace("--attack*", "")
    full = _cli(["--helpfull"], tmp_path).stdout
    assert "--attack_images: The curves" in full and "(default: '200')" in full


def test_cli_user_errors_are_one_line(tmp_path, tiny_run, data_dir):
    _, run_dir = tiny_run
    _assert_one_line_error(_cli(["--dataset=imagenet"], tmp_path), "unknown dataset")
    _assert_one_line_error(_cli(["--train_limit=1"], tmp_path), "--train_limit")
    _assert_one_line_error(_cli(["--percentiles=1,x"], tmp_path),
                           "--percentiles must be numbers, got ['1', 'x']")
    _assert_one_line_error(_cli(["--attack_images=0", "--attack_cw_steps=0"], tmp_path),
                           "--attack_images=0 --attack_cw_steps=0 must be >= 1")
    (tmp_path / "file").write_text("")
    _assert_one_line_error(_cli([f"--run_dir={tmp_path / 'file' / 'run'}"], tmp_path),
                           "not writable")
    _assert_one_line_error(_cli(["--stages=train", f"--run_dir={tmp_path / 'r'}"], tmp_path),
                           "needs the outputs of ingest")
    _assert_one_line_error(_cli(["--stages=attack", f"--run_dir={tmp_path / 'r'}"], tmp_path),
                           f"stage attack needs the outputs of ingest, train, calibrate in "
                           f"{tmp_path / 'r'}; run them first "
                           "(--stages=ingest,train,calibrate,attack)")
    # A corrupt checkpoint: its manifest's sha256 names it; without a manifest (a killed
    # run) the sha256 state.json recorded for it does.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "train" / TrainedModel.LAST).write_bytes(b"garbage")
    args = [f"--run_dir={broken}", "--epochs=3", "--train_limit=1024", f"--data_dir={data_dir}",
            "--lr_schedule=constant"]
    _assert_one_line_error(_cli(args, tmp_path), "last.keras changed since train wrote it")
    (broken / "train" / artifacts.MANIFEST).unlink()
    _assert_one_line_error(_cli(args, tmp_path), "last.keras changed since train wrote it "
                           "(sha256 differs from")


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
    state = work / "train" / TrainedModel.STATE
    done = artifacts.read_json(state)["epoch"]
    assert done == 1
    assert not (work / "train" / artifacts.MANIFEST).exists()
    result = _cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after epoch {done} of 3" in result.stderr
    history = TrainedModel(work / "train").history()
    assert [r["epoch"] for r in history] == [1, 2, 3]
    # one line per epoch trained here, from its history row; no figures without evaluate
    assert [line.split(" ", 1)[1] for line in result.stderr.splitlines()
            if " train: epoch " in line] == [f"train: {summary.epoch_line(row, 3)}"
                                             for row in history[1:]]
    assert result.stdout.startswith("Run finished in ") and result.stdout.endswith(
        f"; its report: {work / 'README.md'}\n")
    final = keras.models.load_model(work / "train" / TrainedModel.LAST)
    assert int(final.optimizer.iterations) == 3 * (256 // 64)  # no step lost or repeated


def test_calibrate_and_evaluate_outputs(tiny_run):
    from pipeline.run_dir import Calibration, Evaluation
    from sdim_tf import rejection

    config, run_dir = tiny_run
    config = config.resolve()  # the presets the run applied
    run_view = Run(run_dir)
    saved = artifacts.read_json(run_dir / "calibrate" / Calibration.THRESHOLDS)
    # The preset holds out the last 5000 training images for calibration.
    assert config.train.validation_split == 5000
    assert saved["source"] == "validation" and saved["examples"] == {
        "skip": 55000, "limit": 5000, "num_samples": 5000}
    assert saved["score"] == "feature_density" and saved["score_settings"]["split"] is True
    # The fitted densities are numpy's class means and pooled covariance of the features
    # of the 1024 trained images (no augmentation), shrunk by scikit-learn's OAS where the
    # fit chose it: 1024 images are from d to 10 x d on every default layer, where held-out
    # folds choose.
    from sklearn.covariance import OAS

    images, train_labels = run_view.examples.arrays("train", limit=1024)
    features = run_view.model.best().encoder.features(images, training=False)
    parameters = np.load(run_dir / "calibrate" / "density.npz")
    for layer in saved["score_settings"]["layers"]:
        record = saved["density_fit"]["covariance"][layer]
        x = features[layer].numpy().astype(np.float64)
        assert (record["images"], record["dimensions"]) == (1024, x.shape[1])
        assert "held-out training images over 5 folds" in record["why"]
        means = np.stack([x[train_labels == c].mean(0) for c in range(10)])
        np.testing.assert_allclose(parameters[f"{layer}/means"], means, rtol=1e-3,
                                   atol=1e-4 * np.abs(means).max())
        centred = x - means[train_labels]
        covariance = OAS(assume_centered=True).fit(centred).covariance_ \
            if record["covariance"] == "oas" else np.cov(centred.T, bias=True)
        factor = parameters[f"{layer}/precision_factor"].astype(np.float64)
        inverse = np.linalg.inv(factor)
        recovered = inverse.T @ inverse  # (L L^T)^-1 = covariance + ridge
        np.testing.assert_allclose(recovered, covariance, rtol=1e-2,
                                   atol=1e-3 * np.abs(covariance).max())
    # Independent recomputation from the deployed scores on the same images.
    model = run_view.scoring_model()
    ll, labels = rejection.class_scores(model, run_view.examples.dataset("train", 55000, 5000))
    # The deployed thresholds: split conformal on the top scores of all 5000 held-out images,
    # the k-th smallest with k the largest such that P(Binomial(5000, 0.04) >= k) >= 0.95.
    # The default rule for feature_density: one threshold for every class.
    from scipy import stats

    assert saved["threshold_rule"] == config.calibrate.threshold_rule == "shared"
    assert saved["deployed"]["percentile"] == "conformal" and saved["deployed"]["min_gap"] is None
    ks = np.arange(1, 5001)
    k = ks[stats.binom.cdf(ks - 1, 5000, config.calibrate.reject_budget) <= 0.05].max()
    assert 150 < k < 200  # below the 200 of the plain 4% budget
    ordered = np.sort(ll.max(1))
    np.testing.assert_allclose(saved["percentiles"]["conformal"]["thresholds"],
                               [ordered[k - 1]] * 10, rtol=1e-6)
    assert saved["deployed"]["guarantee"].startswith(
        "rejects at most 4% of images drawn like the 5000 calibration images, with 95% "
        "confidence")
    correct = ll.argmax(1) == labels
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
    # The shift suite, one cell recomputed: the first 200 test images shifted right by 3
    # pixels, the deployed rule on the scoring model's scores.
    from sdim_tf import shifts

    images, labels = run_view.examples.arrays("test", limit=200)
    moved = np.zeros_like(images)
    moved[:, :, 3:] = images[:, :, :-3]
    scores = model.predict(moved, verbose=0).astype(np.float64)
    deployed = np.array(saved["percentiles"]["conformal"]["thresholds"], np.float64)
    rejected = scores.max(1) < deployed[scores.argmax(1)]
    wrong = scores.argmax(1) != labels
    cell = report["shifts"]["corruptions"]["translate"][str(shifts.PARAMETERS["translate"].index(3)
                                                             + 1)]
    assert cell["rejected"] == pytest.approx(rejected.mean(), abs=0.006)  # one image of 200
    assert cell["silent_error"] == pytest.approx((wrong & ~rejected).mean(), abs=0.006)
    assert report["shifts"]["images"] == 200 and "risk_coverage.png" in report["figures"]
    md = (run_dir / "evaluate" / Evaluation.REPORT_MD).read_text()
    for table in ("Table 1", "Table 2", "Table 3", "Shifted inputs", "What this means"):
        assert table in md
    for figure in report["figures"]:
        import matplotlib.image

        assert matplotlib.image.imread(run_dir / "evaluate" / figure).shape[0] > 100


def test_a_constant_rate_run_rerun_without_the_flag_is_refused_not_wiped(tmp_path, tiny_run):
    """A --lr_schedule=constant run, rerun under the default cosine schedule, names the flag
    that resumes it instead of deleting the trained model to start afresh."""
    import shutil

    _, run_dir = tiny_run
    work = tmp_path / "run"
    work.mkdir()
    shutil.copytree(run_dir / "ingest", work / "ingest")
    args = [f"--run_dir={work}", "--stages=ingest,train", "--epochs=1", "--train_limit=256",
            "--batch_size=64"]
    result = _cli([*args, "--lr_schedule=constant"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = (work / "train" / TrainedModel.LAST).read_bytes()
    refused = _cli(args, tmp_path)
    assert refused.returncode == 1
    assert ("holds 1 epoch(s) trained with --lr_schedule=constant: rerun with "
            "--lr_schedule=constant" in refused.stderr), refused.stderr[-3000:]
    assert (work / "train" / TrainedModel.LAST).read_bytes() == trained
    result = _cli([*args, "--lr_schedule=constant", "--epochs=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch 1 of 2" in result.stderr


def test_cosine_learning_rate_resumes_on_its_schedule(tmp_path, tiny_run):
    """--lr_schedule=cosine: 0.5 lr (1 + cos(pi t / T)) after each epoch's t steps, carried
    across a kill; another --epochs is refused, killed or finished, with the model kept;
    --force starts afresh on the new length's schedule."""
    import shutil

    _, run_dir = tiny_run
    work = tmp_path / "run"
    work.mkdir()
    shutil.copytree(run_dir / "ingest", work / "ingest")
    args = [f"--run_dir={work}", "--stages=ingest,train", "--train_limit=256",
            "--batch_size=64", "--lr_schedule=cosine", "--learning_rate=0.002"]

    def cosine(t, total):
        return 0.5 * 0.002 * (1 + np.cos(np.pi * t / total))

    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2",
               **{faults.ENV: "train.epoch_done:1"})
    killed = subprocess.run([sys.executable, "-m", "pipeline.run", *args, "--epochs=2"],
                            cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    refused = _cli([*args, "--epochs=3"], tmp_path)
    assert refused.returncode == 1
    assert ("holds 1 of 2 epochs trained with --lr_schedule=cosine" in refused.stderr
            and "rerun with --epochs=2 to resume it" in refused.stderr), refused.stderr[-3000:]
    result = _cli([*args, "--epochs=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch 1 of 2" in result.stderr
    history = TrainedModel(work / "train").history()
    assert [r["learning_rate"] for r in history] == pytest.approx(
        [cosine(4, 8), cosine(8, 8)], abs=1e-9)
    trained = (work / "train" / TrainedModel.LAST).read_bytes()
    refused = _cli([*args, "--epochs=3"], tmp_path)
    assert refused.returncode == 1 and "holds 2 of 2 epochs" in refused.stderr
    assert (work / "train" / TrainedModel.LAST).read_bytes() == trained
    result = _cli([*args, "--epochs=3", "--stages=train", "--force"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" not in result.stderr
    history = TrainedModel(work / "train").history()
    assert [r["learning_rate"] for r in history] == pytest.approx(
        [cosine(4 * e, 12) for e in (1, 2, 3)], abs=1e-9)
    final = keras.models.load_model(work / "train" / TrainedModel.LAST)
    assert int(final.optimizer.iterations) == 12
