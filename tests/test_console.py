"""What the commands print: one `error:` line per error and nothing of TensorFlow's unless
--verbose, progress lines that suit a log file, one line per epoch."""

import io
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging

from pipeline import console, summary

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME = r"\d\d:\d\d:\d\d"
# The flags pipeline.run shares by name with pipeline.predict or pipeline.monitor, and why
# each means the same in both.
SHARED_FLAGS = {
    "verbose": "console.define_flags defines it for every command",
    "beam_pipeline_args": "the options of the Apache Beam pipeline: run's ingest driver, "
                          "predict's driver",
    "reject_budget": "the rejection rate alpha the deployment promises: run calibrates it, "
                     "monitor watches it"}


def _command(module: str, *args, cwd) -> subprocess.CompletedProcess:
    """`python -m <module> args` as a user starts it: no TF_CPP_MIN_LOG_LEVEL of ours."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_an_error_is_one_line_and_tensorflow_prints_nothing(tmp_path):
    result = _command("pipeline.run", "--dataset=imagenet", f"--run_dir={tmp_path / 'r'}",
                      cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: --dataset: unknown dataset 'imagenet'; known: cifar10, fashion_mnist, "
        "image_folder, mnist, svhn_cropped"]


def test_a_bad_flag_is_one_line_in_every_command(tmp_path):
    for module, args, message in [
            ("pipeline.run", ["--epochs=x"],
             "error: flag --epochs=x: invalid literal for int() with base 10: 'x' "
             "(--help lists the flags)"),
            ("pipeline.monitor", ["--shift=x", "p.csv"],
             "error: flag --shift=x: could not convert string to float: 'x' "
             "(--help lists the flags)"),
            ("pipeline.predict", [f"--model_dir={tmp_path / 'none'}", "a.png"],
             f"error: --model_dir={tmp_path / 'none'}: no such folder")]:
        result = _command(module, *args, cwd=tmp_path)
        assert result.returncode == 1, module
        assert result.stderr.splitlines() == [message], module


def test_log_lines_are_short_and_verbose_gives_absls_own(tmp_path):
    """A run that logs its plan and then fails: the short format, else with --verbose
    absl's (level, date, time, thread, file:line)."""
    args = ["--stages=train", f"--run_dir={tmp_path / 'r'}"]
    error = (f"error: stage train needs the outputs of ingest in {tmp_path / 'r' / 'ingest'}; "
             "run it first (--stages=ingest,train)")
    quiet = _command("pipeline.run", *args, cwd=tmp_path).stderr.splitlines()
    assert len(quiet) == 2 and quiet[1] == error
    assert re.fullmatch(f"{TIME} run: fashion_mnist \\(sdim\\) in {tmp_path / 'r'}; "
                        "stages train", quiet[0]), quiet[0]
    loud = _command("pipeline.run", *args, "--verbose", cwd=tmp_path).stderr.splitlines()
    assert loud[-1] == error
    assert any(re.fullmatch(rf"I\d{{4}} {TIME}\.\d+ +\d+ run\.py:\d+\] run: fashion_mnist "
                            rf"\(sdim\) in .*; stages train", line) for line in loud), loud


def _flags(define) -> dict[str, flags.Flag]:
    """The flags `define` makes, in a registry of their own."""
    flag_values = flags.FlagValues()
    define(flag_values)
    return {name: flag_values[name] for name in flag_values}


def test_a_flag_name_means_one_thing_across_commands():
    from pipeline import monitor, predict, run

    ran = _flags(run.define_flags)
    shared = set()
    for command in (predict, monitor):
        own = _flags(command.define_flags)
        both = set(ran) & set(own)
        assert both <= set(SHARED_FLAGS), (command.__name__, sorted(both - set(SHARED_FLAGS)))
        assert all(own[name].flag_type() == ran[name].flag_type() for name in both), both
        shared |= both
    assert shared == set(SHARED_FLAGS)  # no stale entry


@pytest.mark.parametrize("argv, verbose", [
    (["run"], False), (["run", "--verbose"], True), (["run", "--verbose=false"], False),
    (["run", "--verbose", "--noverbose"], False), (["run", "--noverbose", "--verbose=1"], True),
    (["run", "-verbose"], True), (["run", "--", "--verbose"], False),
    (["run", "--verbosity=1"], False)])
def test_verbose_is_read_as_absl_reads_it(argv, verbose):
    assert console.verbose_requested(argv) is verbose


def test_durations():
    assert [console.duration(s) for s in (0.4, 42, 119.6, 581, 7199, 7500)] == \
        ["0 s", "42 s", "2 min 00 s", "9 min 41 s", "119 min 59 s", "2 h 05 min"]


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_file_is_a_line_per_interval(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    lines = []
    monkeypatch.setattr(absl_logging, "info", lambda fmt, *args: lines.append(fmt % args))
    stream = io.StringIO()  # not a terminal
    with console.Progress("evaluate: shift suite", 4, "part", every=15, stream=stream) as bar:
        for done, at in ((1, 10), (2, 20), (3, 30), (4, 40)):
            clock.now = 1000.0 + at
            bar.update(done, loss=12.345678)
    # 10 s: under the interval; 20 s: a line; 30 s: 10 s after it; 40 s: done, no line
    assert lines == ["evaluate: shift suite: 2/4 parts (50%), 20 s, about 20 s left  "
                     "loss 12.35"]
    assert stream.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    lines = []
    monkeypatch.setattr(absl_logging, "info", lambda fmt, *args: lines.append(fmt % args))
    stream = Terminal()
    with console.Progress("train: epoch 1/2", 16, every=0, stream=stream) as bar:
        for done in range(1, 17):
            bar.update(done, loss=3.5)
        drawn = stream.getvalue()
    assert lines == []
    assert "train: epoch 1/2" in drawn and "16/16" in drawn and "loss 3.5" in drawn
    quiet = Terminal()
    with console.Progress("predict", 3, "file", shown=False, stream=quiet) as bar:
        bar.update(2)
    assert quiet.getvalue() == "" and lines == []


def test_the_epoch_line():
    row = {"epoch": 3.0, "loss": 12.3456, "mi_loss": 0.1, "accuracy": 0.91234,
           "test_accuracy": 0.9076, "monitor/model/rejected": 0.05,
           "monitor/model/mean_outlier_rejected": 0.2,
           "monitor/density_quad3_quad4_head_split/rejected": 0.041,
           "monitor/density_quad3_quad4_head_split/mean_outlier_rejected": 0.97,
           "monitor_seconds": 9.5, "seconds": 127.4}
    assert summary.epoch_line(row, 50) == ("epoch 3/50  loss 12.35  acc 91.2%  test 90.8%  "
                                           "held-out rejected 4.1%  outliers rejected 97.0%  "
                                           "2 min 07 s")
    # after the last epoch: the whole test set; without a watched density: the model's score
    last = {"epoch": 50, "loss": 2.0, "accuracy": 0.95, "test_accuracy": 0.9, "seconds": 3000,
            "test_accuracy_full": 0.9516, "monitor/model/rejected": 0.04,
            "monitor/model/mean_outlier_rejected": 0.5}
    assert summary.epoch_line(last, 50) == ("epoch 50/50  loss 2  acc 95.0%  test 95.2%  "
                                            "held-out rejected 4.0%  outliers rejected 50.0%  "
                                            "50 min 00 s")
    assert summary.epoch_line({"epoch": 1, "loss": 0.5}, 1) == "epoch 1/1  loss 0.5"


def test_the_headline_of_a_report_with_both_refusals(tmp_path):
    """What the SavedModel does (report["deployed"]) leads; both promises are named."""
    evaluate = tmp_path / "evaluate"
    evaluate.mkdir()
    report = {
        "dataset": "fashion_mnist", "num_test": 10000, "accuracy": 0.9516,
        "deployed_percentile": "conformal",
        "selective": {"conformal": {"accuracy": 0.9516, "accuracy_left": 0.97,
                                    "reject_rate": 0.035}},
        # in the order a sorted JSON writes them; the unfamiliar promise is shown first
        "promises": {"ambiguous": "at most 2% wrong", "unfamiliar": "rejects at most 4% of images"},
        "deployed": {"test": {"rejected": 0.05, "ambiguous": 0.015,
                              "accuracy_on_accepted": 0.98, "silent_error": 0.019},
                     "ood": {"mnist": {"rejected": 0.9669}}},
        "ood": {"mnist": {"num": 10000, "decision_rejection_rate": {"conformal": 0.9},
                          "separation": {"logsumexp": {"auroc": 0.5},
                                         "max_log_likelihood": {"auroc": 0.99291}}},
                "uniform_noise": {"num": 2000, "decision_rejection_rate": {"conformal": 1.0},
                                  "separation": {"max_log_likelihood": {"auroc": 1.0}}}},
        "shifts": {"images": 2000, "corruptions": {f"c{i}": {} for i in range(11)},
                   "mean_silent_error_middle": 0.0523}}
    (evaluate / "report.json").write_text(json.dumps(report))
    (evaluate / "manifest.json").write_text("{}")
    assert summary.headline(tmp_path) == [
        ("test accuracy", "95.16% of 10000 test images"),
        ("test images rejected", "5.00% (1.50% as ambiguous)"),
        ("right among the accepted", "98.00%"),
        ("silent error", "1.90% (accepted and wrong, a share of all test images)"),
        ("promise", "rejects at most 4% of images"),
        ("promise (ambiguous)", "at most 2% wrong"),
        ("mnist rejected / AUROC", "96.69% / 0.9929 (10000 images never seen)"),
        ("other outliers rejected", "uniform_noise 100.00%"),
        ("silent error, corrupted", "5.23% (11 corruptions at severity 3, first 2000 test "
                                    "images)")]
    # a report without the SavedModel's outcomes: the deployed row of Table 2
    del report["deployed"], report["promises"]
    report["guarantee"] = "rejects at most 4%"
    (evaluate / "report.json").write_text(json.dumps(report))
    rows = dict(summary.headline(tmp_path))
    assert rows["test images rejected"] == "3.50%"
    assert rows["silent error"].startswith(f"{100 * 0.965 * 0.03:.2f}% ")
    assert rows["promise"] == "rejects at most 4%"
    assert rows["mnist rejected / AUROC"].startswith("90.00% / 0.9929")
