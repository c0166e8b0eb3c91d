"""Kills in every stage, a full disk, corrupted artifacts: the rerun of the same
command finishes, and nothing a run trusts is partial, repeated or silently damaged.

The runs are the smoke configuration of the kill test in test_pipeline.py (256 images in
batches of 64: 4 steps per epoch) without held-out images, which only add monitoring and
calibration work, not write paths. One run directory goes through both training trials;
a copy of it through the kills of calibrate, evaluate and export; further copies through
the disk-full and corruption trials.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import resource
import shutil
import signal
import struct
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

from pipeline import artifacts, checkpoints, faults, run
from pipeline.config import PipelineConfig
from pipeline.run_dir import ArtifactError, Calibration, TrainedModel
from pipeline.stages import evaluate, export, train
from sdim_tf import publish

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 256 // 64  # training steps per epoch
KILLED = -signal.SIGKILL
# A file size limit below a checkpoint's or a SavedModel's size (both several MiB) and above
# every JSON file a stage writes.
FILE_SIZE_LIMIT = 1 << 20


def _args(root: pathlib.Path, epochs: int, stages: str, data_dir: pathlib.Path) -> list[str]:
    # a smoke run: published beside its run as a subset, whatever the gate says
    return [f"--run_dir={root / 'run'}", f"--export_dir={root / 'saved_models'}",
            "--export_subset", "--force_export",
            f"--epochs={epochs}", "--train_limit=256", "--batch_size=64",
            "--validation_split=0", "--reject_budget=0", "--shift_images=0",
            "--lr_schedule=constant",  # so the 2-epoch run can be taken to 3
            f"--stages={stages}", f"--data_dir={data_dir}"]


def _limit_file_size() -> None:
    """preexec_fn: writes past the limit fail with EFBIG instead of a SIGXFSZ kill."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def _pipeline(args: list[str], fault: str | None = None, limit_file_size: bool = False
              ) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900,
                          preexec_fn=_limit_file_size if limit_file_size else None)


def _facts(root: pathlib.Path, model: bool = False) -> dict:
    """What a run left on disk: per stage folder, whether it is committed (manifest) and which
    outputs differ from their recorded sha256; temporaries; history; exported versions."""
    run_dir, model_dir = root / "run", root / "saved_models" / "fashion_mnist"
    stages = {}
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if not folder.name.startswith("."):
            committed = (folder / artifacts.MANIFEST).is_file()
            stages[folder.name] = artifacts.changed_outputs(folder) if committed else None
    facts = {
        "stages": stages,  # name -> changed outputs ([] when sound), None without manifest
        "temps": sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                        if artifacts.TEMP.match(p.name) or p.name.endswith(".next")),
        "state_epoch": None, "history": None, "iterations": None,
        "versions": sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        if model_dir.exists() else [],
        "export_temps": sorted(p.name for p in model_dir.iterdir() if not p.name.isdigit())
        if model_dir.exists() else []}
    trained = TrainedModel(run_dir / "train")
    if (trained.folder / TrainedModel.STATE).exists():
        facts["state_epoch"] = trained.state()["epoch"]
        facts["history"] = [int(r["epoch"]) for r in trained.history()]
    if model and trained.last_path.exists():
        facts["iterations"] = int(keras.models.load_model(trained.last_path).optimizer.iterations)
    return facts


@dataclasses.dataclass
class Trial:
    """A run killed at a fault point, then the same command rerun without it."""

    killed: subprocess.CompletedProcess
    after_kill: dict
    rerun: subprocess.CompletedProcess
    after_rerun: dict


def _trial(root: pathlib.Path, args: list[str], fault: str, model: bool = False) -> Trial:
    killed = _pipeline(args, fault)
    after_kill = _facts(root, model)
    rerun = _pipeline(args)
    return Trial(killed, after_kill, rerun, _facts(root, model))


def _assert_killed_then_finished(trial: Trial, stage: str) -> None:
    assert trial.killed.returncode == KILLED, trial.killed.stderr[-3000:]
    assert trial.after_kill["stages"][stage] is None  # not committed: the rerun redoes it
    assert all(changed == [] for name, changed in trial.after_kill["stages"].items()
               if name != stage), trial.after_kill  # the others stay sound
    assert trial.rerun.returncode == 0, trial.rerun.stderr[-3000:]


def _assert_sound(facts: dict, epochs: int) -> None:
    """Every stage folder committed with intact outputs, each epoch once, no temporaries."""
    assert facts["stages"] and all(c == [] for c in facts["stages"].values()), facts["stages"]
    assert facts["history"] == list(range(1, epochs + 1))
    assert facts["state_epoch"] == epochs
    assert facts["temps"] == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> dict:
    """Two kill trials of ingest + train in one run directory: mid-epoch (2 epochs), then
    while epoch 3's checkpoint is put in place (the same run taken to 3 epochs)."""
    root = tmp_path_factory.mktemp("faults") / "trained"
    mid_epoch = _trial(root, _args(root, 2, "ingest,train", data_dir),
                       f"train.step:{STEPS + 2}", model=True)  # epoch 2, step 2 of 4
    checkpoint = _trial(root, _args(root, 3, "ingest,train", data_dir),
                        f"{artifacts.BEFORE_RENAME}/{pathlib.Path(TrainedModel.LAST).name}:1",
                        model=True)
    return {"root": root, "mid_epoch": mid_epoch, "checkpoint": checkpoint}


def test_a_kill_mid_epoch_resumes_that_epoch(trained):
    trial = trained["mid_epoch"]
    _assert_killed_then_finished(trial, "train")
    assert trial.after_kill["state_epoch"] == 1 and trial.after_kill["history"] == [1]
    assert trial.after_kill["temps"] == []  # killed between steps: nothing being written
    assert "resuming after epoch 1 of 2" in trial.rerun.stderr
    _assert_sound(trial.after_rerun, epochs=2)
    assert trial.after_rerun["iterations"] == 2 * STEPS  # no step lost or repeated


def test_a_kill_while_a_checkpoint_is_put_in_place_rolls_it_forward(trained):
    """Killed after state.json committed epoch 3, before its checkpoint replaced epoch 2's:
    the rerun puts the committed checkpoint in place instead of training epoch 3 again on
    top of it (or resuming epoch 2's weights as if they were epoch 3's)."""
    trial = trained["checkpoint"]
    _assert_killed_then_finished(trial, "train")
    assert trial.after_kill["state_epoch"] == 3 and trial.after_kill["history"] == [1, 2, 3]
    assert trial.after_kill["iterations"] == 2 * STEPS  # last.keras still epoch 2's
    assert "train/checkpoints/last.keras.next" in trial.after_kill["temps"]
    assert "resuming after epoch 3 of 3" in trial.rerun.stderr
    assert "train: epoch 3/3" not in trial.rerun.stderr  # nothing trained again
    _assert_sound(trial.after_rerun, epochs=3)
    assert trial.after_rerun["iterations"] == 3 * STEPS


@pytest.fixture(scope="module")
def downstream(trained, data_dir) -> dict:
    """On a copy of the trained run: a kill in calibrate (density.npz written,
    thresholds.json not yet), in evaluate (every output written, the manifest not yet) and in
    export (the SavedModel complete in its temporary folder); each stage rerun after its kill."""
    root = trained["root"].parent / "downstream"
    shutil.copytree(trained["root"], root)
    trials = {}
    for stage, fault in (("calibrate", f"{artifacts.BEFORE_RENAME}/{Calibration.THRESHOLDS}:1"),
                         ("evaluate", f"{artifacts.BEFORE_RENAME}/{artifacts.MANIFEST}:1"),
                         ("export", "serving.before_rename:1")):
        trials[stage] = _trial(root, _args(root, 3, stage, data_dir), fault)
    return {"root": root, **trials}


def test_a_kill_in_calibrate_is_redone(downstream):
    trial = downstream["calibrate"]
    _assert_killed_then_finished(trial, "calibrate")
    assert [pathlib.Path(t).name.split(".tmp-")[0] for t in trial.after_kill["temps"]] == [
        f".{Calibration.THRESHOLDS}"]
    _assert_sound(trial.after_rerun, epochs=3)


def test_a_kill_before_evaluate_commits_is_redone(downstream):
    trial = downstream["evaluate"]
    _assert_killed_then_finished(trial, "evaluate")
    assert "evaluate: running" in trial.rerun.stderr  # outputs complete, but not committed
    _assert_sound(trial.after_rerun, epochs=3)


def test_a_kill_in_export_publishes_no_version_and_the_rerun_a_complete_one(downstream):
    trial = downstream["export"]
    _assert_killed_then_finished(trial, "export")
    assert trial.after_kill["versions"] == []  # the complete SavedModel was never published
    assert len(trial.after_kill["export_temps"]) == 1
    _assert_sound(trial.after_rerun, epochs=3)
    assert trial.after_rerun["versions"] == [1]
    assert trial.after_rerun["export_temps"] == []  # the killed export's folder removed
    _assert_versions_complete(downstream["root"] / "saved_models" / "fashion_mnist")


def test_a_kill_in_evaluate_resumes_after_its_finished_parts(downstream, data_dir):
    """Killed after its second finished part, evaluate reruns without recomputing the two
    (their files untouched) and writes the report of an uninterrupted run: downstream's,
    whose parts one process computed."""
    root = downstream["root"].parent / "evaluate_parts"
    shutil.copytree(downstream["root"], root)
    stage_dir = root / "run" / "evaluate"
    uninterrupted = artifacts.read_json(stage_dir / evaluate.REPORT_JSON)
    shutil.rmtree(stage_dir)
    args = _args(root, 3, "evaluate", data_dir)
    killed = _pipeline(args, f"{evaluate.PART_DONE}:2")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    parts = stage_dir / evaluate.PARTS
    finished = {p: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert sorted(p.name for p in finished) == [  # the order of faults.py
        "ood_mnist.json", "ood_mnist.npz", "test.json", "test.npz"]
    rerun = _pipeline(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    for name in ("test", "ood_mnist"):
        assert f"evaluate: {name} kept from an earlier run" in rerun.stderr
    assert len(list(parts.glob("*.json"))) > len(finished) // 2  # the others computed now
    assert artifacts.read_json(stage_dir / evaluate.REPORT_JSON) == uninterrupted
    _assert_sound(_facts(root), epochs=3)


def _assert_versions_complete(model_dir: pathlib.Path) -> None:
    """Every published version loads with its assets; whatever else lies there is a
    temporary folder no server or later export takes for a version."""
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    for version in versions:
        folder = model_dir / str(version)
        for name in ("saved_model.pb", "variables/variables.index", "assets/thresholds.json",
                     "assets/model_card.json", f"assets.extra/{export.WARMUP_FILE}"):
            assert (folder / name).is_file(), (version, name)
        loaded = tf.saved_model.load(str(folder))
        out = loaded.signatures["serving_default"](images=tf.zeros([2, 32, 32, 1]))
        assert out["class_ids"].shape == (2,) and out["reason"].shape == (2,)
    assert all(p.name.startswith(".export-tmp-") for p in model_dir.iterdir()
               if not p.name.isdigit())
    assert publish.next_version(model_dir) == max(versions, default=0) + 1


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def test_a_full_disk_in_export_is_one_line_and_leaves_nothing_half_written(downstream,
                                                                             data_dir):
    root = downstream["root"].parent / "disk_full"
    shutil.copytree(downstream["root"], root)
    model_dir = root / "saved_models" / "fashion_mnist"
    before = sorted(p.name for p in model_dir.iterdir())
    args = _args(root, 3, "export", data_dir)
    line = _one_line_error(_pipeline(args, limit_file_size=True))
    assert line.startswith("error: stage export: a write failed (File too large: ")
    assert "free space and rerun the same command" in line
    assert sorted(p.name for p in model_dir.iterdir()) == before  # no version, no temporary
    assert _facts(root)["stages"]["export"] is None  # the stage reruns
    result = _pipeline(args)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = _facts(root)
    _assert_sound(facts, epochs=3)
    assert facts["versions"] == [1, 2]
    _assert_versions_complete(model_dir)


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_last_epoch(trained, data_dir):
    root = trained["root"].parent / "disk_full_train"
    shutil.copytree(trained["root"], root)
    args = _args(root, 4, "ingest,train", data_dir)
    line = _one_line_error(_pipeline(args, limit_file_size=True))
    assert line.startswith("error: stage train: a write failed (File too large")
    facts = _facts(root)  # epoch 3 stands, whole; the rerun resumes from it (as after a kill)
    assert facts["stages"]["train"] is None and facts["temps"] == []
    assert facts["state_epoch"] == 3 and facts["history"] == [1, 2, 3]


# Corrupted artifacts: the README's rule is that a stage whose own output changed reruns, and
# a changed checkpoint (train/) or upstream output is a one-line error naming the file.
# test_pipeline.py covers an edited thresholds.json rerunning calibrate, a flipped best.keras
# read by calibrate, and a truncated test shard read by train; these cover the rest.

def _copy(downstream, tmp_path) -> tuple[pathlib.Path, PipelineConfig]:
    shutil.copytree(downstream["root"], tmp_path / "root")
    run_dir = tmp_path / "root" / "run"
    return run_dir, PipelineConfig.from_flat(
        dataset="fashion_mnist", epochs=3, train_limit=256, batch_size=64,
        validation_split=0, reject_budget=0, shift_images=0, lr_schedule="constant",
        run_dir=str(run_dir), export_dir=str(tmp_path / "root" / "saved_models"),
        export_subset=True, force_export=True)


def _flip(path: pathlib.Path, offset: int) -> None:
    content = bytearray(path.read_bytes())
    content[offset] ^= 0xFF
    path.write_bytes(bytes(content))


def _zip_directory_time(path: pathlib.Path) -> int:
    """The offset of the first central-directory entry's modification time in a zip (a
    .keras file): a byte no reader checks."""
    content = path.read_bytes()
    end = content.rfind(b"PK\x05\x06")  # end of central directory record
    directory = struct.unpack("<I", content[end + 16:end + 20])[0]
    assert content[directory:directory + 4] == b"PK\x01\x02"
    return directory + 12


def test_an_edited_thresholds_file_is_named_downstream_and_not_exported(downstream,
                                                                         tmp_path, data_dir):
    run_dir, _ = _copy(downstream, tmp_path)
    thresholds = run_dir / "calibrate" / Calibration.THRESHOLDS
    thresholds.write_text(thresholds.read_text().replace('"shared"', '"per_class"'))
    root = tmp_path / "root"
    line = _one_line_error(_pipeline(_args(root, 3, "export", data_dir)))
    assert str(thresholds) in line and "changed since calibrate wrote it" in line
    assert sorted(p.name for p in (root / "saved_models" / "fashion_mnist").iterdir()
                  if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("stage, corrupt, message", [
    # a truncated shard read by calibrate and evaluate (train's case is in test_pipeline)
    ("evaluate", lambda d: _truncate(sorted((d / "ingest").glob("test-*.tfrecord"))[0]),
     r"ingest/test-00000-of-00001\.tfrecord changed since ingest wrote it"),
    ("calibrate", lambda d: _truncate(sorted((d / "ingest").glob("train-*.tfrecord"))[0]),
     r"ingest/train-00000-of-00003\.tfrecord changed since ingest wrote it"),
    # a flipped byte in the best checkpoint read by export
    ("export", lambda d: _flip(d / "train" / TrainedModel.BEST, 1000),
     r"train/checkpoints/best\.keras changed since train wrote it"),
    # the fitted density read by evaluate
    ("evaluate", lambda d: _flip(d / "calibrate" / "density.npz", 2000),
     r"calibrate/density\.npz changed since calibrate wrote it"),
])
def test_a_corrupted_upstream_artifact_is_named(downstream, tmp_path, stage, corrupt, message):
    run_dir, config = _copy(downstream, tmp_path)
    corrupt(run_dir)
    with pytest.raises(ArtifactError, match=message):
        run.run(config.replace(stages=(stage,)))
    assert (run_dir / stage / artifacts.MANIFEST).exists()  # refused before running


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_flipped_checkpoint_byte_is_named_when_resuming(downstream, tmp_path):
    """A killed run has no manifest to check its checkpoints against: state.json's sha256
    does it. The byte here lies in the zip's central directory, where Keras' loader notices
    nothing (it loads the model)."""
    run_dir, config = _copy(downstream, tmp_path)
    (run_dir / "train" / artifacts.MANIFEST).unlink()  # as a kill leaves it
    last = run_dir / "train" / TrainedModel.LAST
    _flip(last, _zip_directory_time(last))
    keras.models.load_model(last)  # the damage goes unnoticed by the loader
    with pytest.raises(train.TrainingError, match=r"checkpoint .*last\.keras changed since "
                       r"train wrote it \(sha256 differs from .*state\.json\)"):
        run.run(config.replace(stages=("train",), epochs=4))
    assert artifacts.read_json(run_dir / "train" / TrainedModel.STATE)["epoch"] == 3


# The pieces, without a run.

def test_a_fault_point_counts_its_name_or_its_detail(monkeypatch):
    kills = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setattr(faults, "_reached", faults.collections.Counter())
    monkeypatch.setenv(faults.ENV, "artifacts.before_rename/state.json:2")
    for name in ("history.csv", "state.json", "history.csv", "manifest.json"):
        faults.point("artifacts.before_rename", name)
    assert kills == []  # one visit of state.json so far
    faults.point("artifacts.before_rename", "state.json")
    assert kills == [signal.SIGKILL]
    monkeypatch.setenv(faults.ENV, "train.step:3")
    for _ in range(3):
        faults.point("train.step")
    assert kills == [signal.SIGKILL] * 2


def test_settling_checkpoints_rolls_a_committed_one_forward(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.keras").write_bytes(b"epoch 1")
    (folder / "best.keras").write_bytes(b"epoch 1")
    (folder / "last.keras.next").write_bytes(b"epoch 2")  # committed below
    (folder / "best.keras.next").write_bytes(b"epoch 3")  # not committed
    digest = {p.name: artifacts.sha256_file(p) for p in folder.iterdir()}
    committed = {checkpoints.LAST: digest["last.keras.next"],
                 checkpoints.BEST: digest["best.keras"]}
    checkpoints.settle(tmp_path, committed)
    assert (folder / "last.keras").read_bytes() == b"epoch 2"
    assert (folder / "best.keras").read_bytes() == b"epoch 1"
    assert sorted(p.name for p in folder.iterdir()) == ["best.keras", "last.keras"]
    (folder / "best.keras").write_bytes(b"epoch 1, edited")
    with pytest.raises(train.TrainingError, match=r"best\.keras changed since train wrote"):
        checkpoints.settle(tmp_path, committed)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = [tmp_path / f".state.json.tmp-{dead}",
             tmp_path / "train" / "checkpoints" / f".last.keras.next.tmp-{dead}.keras",
             tmp_path / f".ingest.tmp-{dead}-x1y2"]
    kept = [tmp_path / f".state.json.tmp-{os.getpid()}",  # a live writer's
            tmp_path / "train" / "state.json", tmp_path / "tmp-1234"]
    for path in stale[:2] + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (stale[2] / "shards").mkdir(parents=True)
    assert sorted(artifacts.remove_stale_temps(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_storage_errors_are_recognised_through_wrapping():
    problem = run._storage_problem
    assert problem(OSError(errno.ENOSPC, "No space left on device", "/r/x.json")) == (
        "No space left on device: /r/x.json")
    saved = tf.errors.OutOfRangeError(
        None, None, "{{function_node __wrapped__SaveV2}} /m/.export-tmp-1/variables/v.data; "
        "File too large [Op:SaveV2]")
    assert problem(saved) == "File too large: /m/.export-tmp-1/variables/v.data"
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as e:
            raise ValueError("keras could not save") from e
    except ValueError as wrapped:
        assert problem(wrapped) == os.strerror(errno.EDQUOT)
    assert problem(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")) is None
    assert problem(OSError(errno.EACCES, "Permission denied")) is None
