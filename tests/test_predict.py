"""`python -m pipeline.predict` end to end: real test images written to a folder, plus files
that cannot be classified, against the exported signatures' own answers."""

import csv
import dataclasses
import pathlib
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.util import assert_that, equal_to

from bench.header_bombs import png_header
from pipeline import classify, deployed, predict, predict_beam
from pipeline.run_dir import Run
from sdim_tf import data

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, data_dir):
    """24 Fashion-MNIST and 8 MNIST test images as PNGs in nested folders, one as JPEG, one
    as a 3-channel 56x56 PNG; and four files that cannot be classified."""
    root = tmp_path_factory.mktemp("images")
    fashion, _ = data.load_split("fashion_mnist", "test", str(data_dir))
    digits, _ = data.load_split("mnist", "test", str(data_dir))
    images = {}
    for i, image in enumerate(fashion[:24]):
        images[root / "fashion" / f"{i:02d}.png"] = tf.io.encode_png(image).numpy()
    for i, image in enumerate(digits[:8]):
        images[root / "digits" / "deeper" / f"{i}.png"] = tf.io.encode_png(image).numpy()
    rgb = tf.image.resize(tf.repeat(fashion[24], 3, axis=-1), (56, 56), method="nearest")
    images[root / "rgb.png"] = tf.io.encode_png(tf.cast(rgb, tf.uint8)).numpy()
    images[root / "photo.jpg"] = tf.io.encode_jpeg(fashion[25], quality=95).numpy()
    valid = images[root / "fashion" / "00.png"]
    bad = {root / "corrupt.png": valid[:60],  # the header survives, the body is cut
           root / "notes.txt": b"not an image\n",
           root / "huge.png": png_header(16000, 16000),
           root / "empty.png": b""}
    for path, content in {**images, **bad}.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(valid)  # hidden entries are not searched
    return root, images, bad


@pytest.fixture(scope="module")
def model(tiny_run):
    _, run_dir = tiny_run
    return pathlib.Path(Run(run_dir).export.record()["path"])


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cli(model, out, *args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.predict", f"--model_dir={model.parent}", f"--out={out}",
         *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_answers_as_the_signatures_do(folder, model, tmp_path):
    root, images, bad = folder
    out = tmp_path / "out"
    result = _cli(model, out, root)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read(out / "predictions.csv")
    assert [r["path"] for r in rows] == sorted(str(p) for p in images)
    errors = {pathlib.Path(r["path"]).name: r["reason"] for r in _read(out / "errors.csv")}
    assert errors["notes.txt"] == "not_png_or_jpeg" and errors["empty.png"] == "not_png_or_jpeg"
    assert errors["huge.png"] == "too_large"
    assert errors["corrupt.png"].startswith("decode_failed: ")
    assert "Graph execution error" not in errors["corrupt.png"]
    assert len(errors) == len(bad)

    loaded = tf.saved_model.load(str(model))
    expected = loaded.signatures["classify_encoded"](
        images=tf.constant([images[pathlib.Path(r["path"])] for r in rows]))
    card = deployed.asset(model, "model_card.json")
    names = [card["class_names"][c] for c in expected["class_ids"].numpy()]
    assert [r["class_name"] for r in rows] == names
    score = np.array([float(r["score"]) for r in rows])
    threshold = np.array([float(r["threshold"]) for r in rows])
    # A request the model refused whole is answered file by file: other batch sizes, other
    # float rounding.
    np.testing.assert_allclose(score, expected["score"].numpy(), rtol=1e-5,
                               atol=1e-6 * np.abs(score).max())
    np.testing.assert_array_equal(threshold, expected["threshold"].numpy())
    np.testing.assert_array_equal([float(r["margin"]) for r in rows], score - threshold)
    rejected = np.array([r["rejected"] == "true" for r in rows])
    np.testing.assert_array_equal(rejected, expected["rejected"].numpy())
    np.testing.assert_array_equal(rejected, ~(score >= threshold))
    assert [r["reason"] for r in rows] == [("unfamiliar" if r else "") for r in rejected]

    # The PNGs of source-size grey images are classified as classify_raw classifies them.
    greys = [i for i, r in enumerate(rows) if r["path"].endswith(".png")
             and "rgb" not in r["path"]]
    raw = np.stack([tf.io.decode_png(images[pathlib.Path(rows[i]["path"])]).numpy()
                    for i in greys])
    from_raw = loaded.signatures["classify_raw"](images=tf.constant(raw))
    np.testing.assert_allclose(score[greys], from_raw["score"].numpy(), rtol=1e-5,
                               atol=1e-6 * np.abs(score).max())

    report = (out / "predictions.md").read_text()
    accepted = int((~rejected).sum())
    assert (f"- classified: {len(rows)} ({accepted} accepted, {len(rows) - accepted} rejected)"
            in report)
    assert "| decode_failed | 1 |" in report and "| not_png_or_jpeg | 2 |" in report
    if rejected.any():
        assert (out / "rejected.png").stat().st_size > 0
    assert (out / "accepted_near_threshold.png").exists() == bool(accepted)
    assert not [p for p in out.iterdir() if p.name.startswith(".predict-tmp-")]


def test_saliency_is_the_derivative_of_the_served_score(folder, model):
    """The gradient taken through the loaded SavedModel against a central difference of
    serving_default's score along the gradient's direction."""
    _, images, _ = folder
    predictor = predict.Predictor(model)
    contents = list(images.values())[:4]
    pixels = predictor.preprocess(contents)
    np.testing.assert_allclose(
        pixels[:3], data.preprocess(np.stack([tf.io.decode_png(c).numpy()
                                              for c in contents[:3]])).numpy(), atol=1e-6)
    inside = 0.05 + 0.9 * pixels  # every pixel stays in [0, 1] after the steps below
    grads = predictor.score_gradients(inside)
    serve = predictor.loaded.signatures["serving_default"]
    for x, g in zip(inside, grads, strict=True):
        direction = g / np.linalg.norm(g)
        h = 1e-3  # small against the curvature, large against float32 rounding of score
        up = serve(images=tf.constant((x + h * direction)[None]))["score"].numpy()[0]
        down = serve(images=tf.constant((x - h * direction)[None]))["score"].numpy()[0]
        np.testing.assert_allclose((up - down) / (2 * h), np.linalg.norm(g), rtol=0.05)
    _, maps = predictor.saliency(contents)
    assert maps.shape == pixels.shape[:3] and np.allclose(maps.max(axis=(1, 2)), 1.0)


def test_nothing_classified_is_an_error(folder, model, tmp_path):
    root, _, _ = folder
    result = _cli(model, tmp_path, root / "notes.txt", root / "missing*.png")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no file could be classified (2 listed in {tmp_path}/errors.csv)")
    assert {r["reason"] for r in _read(tmp_path / "errors.csv")} == {"not_png_or_jpeg",
                                                                      "not_found"}


def test_files_folders_and_globs(tmp_path):
    for name in ("a/1.png", "a/b/2.jpg", "a/.git/3.png", "c.png", "d.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files, missing = predict.image_files([str(tmp_path / "a"), str(tmp_path / "*.png"),
                                          str(tmp_path / "c.png"), str(tmp_path / "no*")])
    assert files == [str(tmp_path / n) for n in ("a/1.png", "a/b/2.jpg", "c.png")]
    assert missing == [(str(tmp_path / "no*"), "not_found")]


def test_versions(tmp_path):
    for v in (1, 2, 10):
        (tmp_path / "m" / str(v)).mkdir(parents=True)
        (tmp_path / "m" / str(v) / "saved_model.pb").write_bytes(b"")
    (tmp_path / "m" / "11").mkdir()  # no saved_model.pb: an export in progress, not a version
    assert deployed.version_dir(str(tmp_path / "m")) == tmp_path / "m" / "10"
    assert deployed.version_dir(str(tmp_path / "m"), 2) == tmp_path / "m" / "2"
    assert deployed.version_dir(str(tmp_path / "m" / "1")) == tmp_path / "m" / "1"
    with pytest.raises(deployed.DeployedModelError, match="no version 3; found 1, 2, 10"):
        deployed.version_dir(str(tmp_path / "m"), 3)
    with pytest.raises(deployed.DeployedModelError, match="no such folder"):
        deployed.version_dir(str(tmp_path / "nothing"))
    with pytest.raises(deployed.DeployedModelError, match="assets/model_card.json: missing"):
        deployed.asset(tmp_path / "m" / "1", "model_card.json")


def test_batches_keep_the_request_limits(tmp_path):
    sizes = [5, 5, 5, 20, 3]
    files = []
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"{i}"))
        pathlib.Path(files[-1]).write_bytes(b"x" * n)
    files.append(str(tmp_path / "gone"))
    got = list(predict.batches(files, batch_size=2, max_request_bytes=7, max_image_bytes=10))
    assert [b[0] for b in got] == [[files[0]], [files[1]], [files[2]], [files[4]]]
    errors = [e for b in got for e in b[2]]
    assert errors[0] == (files[3], "too_large") and len(errors) == 2
    assert errors[1][0] == files[5] and errors[1][1].startswith("unreadable: ")
    got = list(predict.batches(files, batch_size=2, max_request_bytes=100, max_image_bytes=10))
    assert [b[0] for b in got] == [files[0:2], [files[2], files[4]]]


def test_beam_driver_writes_what_the_local_driver_writes(folder, model, tmp_path):
    """One file per request: the float scores of a request depend on its other files, and
    BatchElements groups the files otherwise than the local driver."""
    root, images, bad = folder
    for driver in ("local", "beam"):
        result = _cli(model, tmp_path / driver, f"--driver={driver}", "--request_files=1",
                      "--report_images=0", root)
        assert result.returncode == 0, result.stderr[-3000:]
    for name in ("predictions.csv", "errors.csv"):
        assert (tmp_path / "beam" / name).read_text() == (tmp_path / "local" / name).read_text()
    assert [r["path"] for r in _read(tmp_path / "beam" / "predictions.csv")] == sorted(
        str(p) for p in images)
    assert len(_read(tmp_path / "beam" / "errors.csv")) == len(bad)
    assert sorted(p.name for p in (tmp_path / "beam").iterdir()) == [
        "errors.csv", "predictions.csv", "predictions.md"]


def test_beam_driver_in_batches(folder, model, tmp_path):
    """At the default batch size: a request refused whole (corrupt.png) is retried file by
    file on the workers too."""
    root, _, bad = folder
    predictor = predict.Predictor(model)
    files, _ = predict.image_files([str(root)])
    local = predict.predict(predictor, files, progress=False)
    beam_run = predict_beam.predict(model, predictor.class_names,
                                    classify.RequestLimits.of(predictor.limits, 64), files,
                                    work_dir=tmp_path / "work")
    assert beam_run[1] == local[1] and len(local[1]) == len(bad)
    assert not (tmp_path / "work").exists()
    for got, expected in zip(*(run[0] for run in (beam_run, local)), strict=True):
        assert (got.path, got.class_name, got.threshold, got.rejected, got.reason) == (
            expected.path, expected.class_name, expected.threshold, expected.rejected,
            expected.reason)
        np.testing.assert_allclose(got.score, expected.score, rtol=1e-5)


def test_beam_batches_keep_the_request_limits(tmp_path):
    """BatchElements with the handler's arguments, on the files in order, makes the local
    driver's requests."""
    sizes = [3, 3, 3, 5, 2, 6, 1]
    files = []
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"{i}"))
        pathlib.Path(files[-1]).write_bytes(b"x" * n)
    limits = classify.RequestLimits(batch_size=2, max_request_bytes=7, max_image_bytes=10)
    handler = predict_beam.EncodedImagesHandler(tmp_path, [], limits)
    expected = [b[0] for b in predict.batches(files, **dataclasses.asdict(limits))]
    assert expected == [files[0:2], [files[2]], files[3:5], files[5:7]]  # by hand
    with beam.Pipeline() as pipeline:
        batches = (pipeline
                   | beam.Create([(f, pathlib.Path(f).read_bytes()) for f in files],
                                 reshuffle=False)
                   | beam.BatchElements(**handler.batch_elements_kwargs())
                   | beam.Map(lambda batch: [path for path, _ in batch]))
        assert_that(batches, equal_to(expected))


def test_beam_pipeline_args_reach_beam(tmp_path):
    with pytest.raises(predict_beam.BeamOptionsError,
                       match=r"^--beam_pipeline_args: Unexpected pipeline runner: NoSuchRunner"):
        predict_beam.predict(tmp_path, [], classify.RequestLimits(1, 1, 1), [],
                             ["--runner=NoSuchRunner"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_decode_failure_names_tensorflows_cause():
    message = ("Graph execution error:\n\nDetected at node map/while/decode_image/DecodeImage "
               "defined at (most recent call last):\n<stack traces unavailable>\nUnknown image "
               "file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required.\n\t "
               "[[{{node map/while/decode_image/DecodeImage}}]] [Op:__inference_f_200]")
    assert classify.error_cause(message) == ("Unknown image file format. One of JPEG, JPEG XL, "
                                             "PNG, GIF, BMP, WebP required.")
    assert classify.error_cause("no node line\nsecond") == "no node line"
