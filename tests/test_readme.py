"""The README's blocks, run as written, in a fresh folder beside `../shared/datasets` (the
README's data path): the smoke run, loading its SavedModel, `pipeline.predict` on a folder and
`pipeline.monitor` on its CSV; then the library path of docs/development.md.

Run as written, except: the smoke block's first line (`. .venv/bin/activate`): the test runs
in the active environment; the smoke run stands in for the full run whose model "Using the
model" names (`runs/fashion_mnist-sdim` is a link to `runs/smoke`); the library block trains
50 epochs on 55,000 images, so its `epochs=50` and its two slices are replaced (each string
checked to be there) to train one epoch on 1024 images and calibrate on 1000. Not run: the
two install commands (CI runs them, tests/test_docs.py checks they are its commands), TF
Serving (no Docker engine; tests/test_serving_readme.py sends the README's requests) and the
50-epoch runs.
"""

import csv
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from pipeline import artifacts, run, summary
from sdim_tf import data
from tests.conftest import real_data_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LIBRARY_DOC = ROOT / "docs" / "development.md"
TIME = re.compile(r"^\d\d:\d\d:\d\d ")
PREDICTED_FILES = 40


def section(path: pathlib.Path, title: str) -> str:
    """The text of the `## title` section of a markdown file."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", path.read_text(),
                      re.S | re.M)
    assert found, f"{path.name} has no section '## {title}'"
    return found.group(1)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def shell(command: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """A README command in bash, as a user's shell runs it (no TF_CPP_MIN_LOG_LEVEL)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)  # the repository is the package (pip install -e .)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=3600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """A working folder with ../shared/datasets, as the repository has."""
    base = tmp_path_factory.mktemp("readme")
    (base / "shared").mkdir()
    (base / "shared" / "datasets").symlink_to(real_data_dir())
    (base / "work").mkdir()
    return base / "work"


@pytest.fixture(scope="module")
def smoke(folder) -> subprocess.CompletedProcess:
    (block,) = blocks(section(README, "Smoke run"), "bash")
    activate, command = block.replace("\\\n", " ").strip().split("\n")
    assert activate == ". .venv/bin/activate"
    result = shell(command, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "runs" / "fashion_mnist-sdim").symlink_to("smoke")
    return result


def test_the_smoke_run_prints_its_own_lines_and_its_figures(smoke, folder):
    run_dir = pathlib.Path("runs/smoke")
    lines = smoke.stderr.splitlines()
    assert lines and all(TIME.match(line) for line in lines), [
        line for line in lines if not TIME.match(line)][:5]
    assert sum(" train: epoch 1/1  loss " in line for line in lines) == 1
    closing = smoke.stdout.splitlines()
    assert re.fullmatch(r"Run finished in .*; its report: runs/smoke/README\.md", closing[0])
    figures = summary.headline(folder / run_dir)
    assert closing[1:] == summary.text(figures).splitlines()
    assert dict(figures)["SavedModel"] == (
        f"{folder / run_dir / 'saved_models' / 'fashion_mnist' / '1'} (version 1)")
    assert run.closing(folder / run_dir, 1).splitlines()[1:] == closing[1:]


def test_the_saved_model_loads_as_shown(smoke, folder, monkeypatch):
    """The README's block on the first 256 test images (at most --max_batch per request)
    decides as the run's evaluation did on the scores it kept."""
    (code,) = blocks(section(README, "Using the model"), "python")
    images, labels = data.load_split("fashion_mnist", "test")
    monkeypatch.chdir(folder)
    scope = {"uint8_images": images[:256]}
    exec(code, scope)
    run_dir = folder / "runs" / "smoke"
    with np.load(run_dir / "evaluate" / "parts" / "test.npz") as kept:
        scores = kept["scores"][:256]
    saved = artifacts.read_json(run_dir / "calibrate" / "thresholds.json")
    thresholds = np.asarray([np.inf if t is None else t for t in saved["percentiles"][
        saved["deployed"]["percentile"]]["thresholds"]])
    predicted = scores.argmax(1)
    expected = scores.max(1) >= thresholds[predicted]
    np.testing.assert_array_equal(scope["out"]["class_ids"].numpy(), predicted)
    # float32 in the SavedModel against float64 in the report: at most one image at the line
    assert (scope["accepted"] != expected).sum() <= 1


def test_predict_and_monitor_on_a_folder_as_shown(smoke, folder):
    text = section(README, "Using the model")
    (predict,) = [b.strip() for b in blocks(text, "bash") if "pipeline.predict" in b]
    monitor = " ".join(re.search(r"`(python -m pipeline\.monitor\s[^`]*)`", text)
                       .group(1).split())
    images, _ = data.load_split("fashion_mnist", "test")
    (folder / "my_images").mkdir()
    for i, image in enumerate(images[:PREDICTED_FILES]):
        (folder / "my_images" / f"{i:03d}.png").write_bytes(tf.io.encode_png(image).numpy())
    (folder / "my_images" / "notes.txt").write_text("not an image")
    done = shell(predict, folder)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(folder / "predictions" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [pathlib.Path(r["path"]).name for r in rows] == [
        f"{i:03d}.png" for i in range(PREDICTED_FILES)]
    loaded = tf.saved_model.load(str(folder / "runs" / "smoke" / "saved_models" / "fashion_mnist"
                                     / "1"))
    out = loaded.signatures["classify_raw"](images=tf.constant(images[:PREDICTED_FILES]))
    names = data.get_spec("fashion_mnist").class_names
    assert [r["class_name"] for r in rows] == [names[c] for c in out["class_ids"].numpy()]
    assert [r["rejected"] == "true" for r in rows] == list(out["rejected"].numpy())
    with open(folder / "predictions" / "errors.csv", newline="") as f:
        assert [pathlib.Path(r["path"]).name for r in csv.DictReader(f)] == ["notes.txt"]
    watched = shell(monitor, folder)
    assert watched.returncode == 0, watched.stderr[-3000:]
    rejected = sum(r["rejected"] == "true" for r in rows)
    assert f"requests: {PREDICTED_FILES}; rejected {rejected} (" in watched.stdout, watched.stdout


def test_the_library_path_as_shown(tmp_path, monkeypatch):
    (code,) = blocks(section(LIBRARY_DOC, "The library"), "python")
    for full, short in (("epochs=50", "epochs=1"),
                        ("slice(0, 55000), slice(55000, 60000)",
                         "slice(0, 1024), slice(1024, 2024)")):
        assert code.count(full) == 1, full
        code = code.replace(full, short)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    assert scope["log_likelihoods"].shape == (8, 10)
    path = tmp_path / "saved_models" / "my_sdim" / "1"
    assert pathlib.Path(scope["path"]).resolve() == path
    loaded = tf.saved_model.load(str(path))
    images, labels = data.load_split("fashion_mnist", "train")
    answers = [loaded.signatures["classify_raw"](images=tf.constant(images[i:i + 250]))
               for i in range(1024, 2024, 250)]  # --max_batch: 256 images per request
    rejected = np.concatenate([a["rejected"].numpy() for a in answers])
    reasons = np.concatenate([a["reason"].numpy() for a in answers])
    # split conformal on these very images: at most 4% of them refused, as unfamiliar
    assert len(rejected) == 1000 and rejected.mean() <= 0.04
    assert set(reasons[rejected]) <= {b"unfamiliar"} and set(reasons[~rejected]) == {b""}
