"""Ingest stage: the real Fashion-MNIST, your own folders (the streaming driver), broken
inputs."""

import csv
import hashlib
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import artifacts
from pipeline.run_dir import Examples
from pipeline.stages import ingest
from sdim_tf import data
from tests import image_files


def test_real_fashion_mnist_counts_and_statistics(fashion_ingest, data_dir):
    folder, meta = fashion_ingest
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    assert (train["num_examples"], test["num_examples"]) == (60000, 10000)
    assert train["class_counts"] == [6000] * 10 and test["class_counts"] == [1000] * 10
    images = data.load_idx(data_dir / "fashion_mnist" / "t10k-images-idx3-ubyte.gz")
    pixels = images.astype(np.float64) / 255.0
    assert test["pixel_mean"] == pytest.approx(pixels.mean(), abs=1e-12)
    assert test["pixel_std"] == pytest.approx(pixels.std(), abs=1e-12)
    assert meta["image_shape"] == [28, 28, 1] and meta["num_classes"] == 10
    assert meta["class_names"][9] == "Ankle boot"
    on_disk = artifacts.read_json(folder / Examples.METADATA)
    assert on_disk["splits"]["test"]["class_counts"] == [1000] * 10
    for source in meta["sources"]:
        for f in source["files"]:
            assert f["sha256"] == artifacts.sha256_file(f["path"])
    assert (folder / ingest.SKIPPED).read_text() == "split,path,reason\n"
    assert sorted(ingest.outputs(meta)) == sorted(
        ["metadata.json", "skipped.csv", *train["files"], *test["files"]])


def test_records_hold_the_source_images(fashion_ingest, data_dir):
    folder, meta = fashion_ingest
    images, labels = data.load_split("fashion_mnist", "test", data_dir=str(data_dir))
    records = tf.data.TFRecordDataset(Examples(folder).shard_files("test")).batch(10000)
    serialized = next(iter(records))
    got_images, got_labels = data.parse_examples(serialized, meta["image_shape"])
    np.testing.assert_array_equal(got_images.numpy(), images)
    np.testing.assert_array_equal(got_labels.numpy(), labels)
    # the bytes protobuf writes with its map in key order, whatever the process
    for i in range(0, 10000, 997):
        example = tf.train.Example()
        example.ParseFromString(serialized[i].numpy())
        assert example.SerializeToString(deterministic=True) == serialized[i].numpy()


def test_bad_source_writes_nothing(tmp_path):
    src = tmp_path / "src" / "mnist"
    src.mkdir(parents=True)
    data.save_idx(np.zeros((4, 28, 28), np.uint8), src / "train-images-idx3-ubyte.gz")
    data.save_idx(np.zeros((4,), np.uint8), src / "train-labels-idx1-ubyte.gz")
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bbroken")
    data.save_idx(np.zeros((4,), np.uint8), src / "t10k-labels-idx1-ubyte.gz")
    out = tmp_path / "out"
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz: corrupt"):
        ingest.ingest("mnist", out, data_dir=str(tmp_path / "src"))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]  # no temporary folder left


def test_failed_rerun_keeps_previous_output(tmp_path):
    src = tmp_path / "src" / "mnist"
    src.mkdir(parents=True)
    for split in ("train", "test"):
        stems = data.IDX_NAMES[split]
        data.save_idx(np.full((3, 28, 28), 9, np.uint8), src / (stems[0] + ".gz"))
        data.save_idx(np.array([0, 1, 2], np.uint8), src / (stems[1] + ".gz"))
    out = tmp_path / "out"
    first = ingest.ingest("mnist", out, data_dir=str(tmp_path / "src"))
    data.save_idx(np.array([0, 1, 12], np.uint8), src / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match=r"label 12 outside \[0, 10\)"):
        ingest.ingest("mnist", out, data_dir=str(tmp_path / "src"))
    assert artifacts.read_json(out / Examples.METADATA) == first


# ------------------------------------------------------------------- your own folders

def _mixed_folder(root):
    """train/ and test/ of two classes in mixed sizes, modes and formats: {path: pixels
    as the decoder gives them in colour}."""
    rng = np.random.default_rng(0)
    sources = {}
    modes = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("JPEG", "RGB")]
    for split, per_class in (("train", 5), ("test", 2)):
        for name in ("bird", "ant"):
            for i in range(per_class):
                fmt, mode = modes[i % len(modes)] if split == "train" else modes[i]
                h, w = (int(v) for v in rng.integers(10, 60, 2))
                pixels = image_files.smooth(rng, h, w, 4 if mode == "RGBA" else 3)
                path = image_files.write(root / split / name / f"{i}.{fmt.lower()}", pixels,
                                         fmt, mode)
                with Image.open(path) as opened:
                    sources[str(path)] = np.asarray(opened.convert("RGB"))
    grey16 = rng.integers(0, 65536, (30, 17), dtype=np.uint16)
    path = root / "train" / "ant" / "16bit.png"
    Image.fromarray(grey16).save(path)
    sources[str(path)] = np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1)
    return sources


def _records(folder, split, shape):
    files = Examples(folder).shard_files(split)
    batches = [data.parse_examples(b, shape) for b in
               tf.data.TFRecordDataset(files).batch(1000)]
    return (np.concatenate([b[0].numpy() for b in batches]),
            np.concatenate([b[1].numpy() for b in batches]))


def _files_csv(folder):
    with open(folder / data.FILES, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_ingest_brings_every_image_to_the_policy(tmp_path):
    sources = _mixed_folder(tmp_path / "src")
    meta = ingest.ingest("image_folder", tmp_path / "out", str(tmp_path / "src"),
                         progress=False)
    assert meta["class_names"] == ["ant", "bird"] and meta["num_classes"] == 2
    assert meta["image_shape"] == [32, 32, 3]  # 10 colour headers against 5 grey
    assert meta["folder"]["channel_votes"] == {"1": 5, "3": 10}
    assert meta["splits"]["train"]["class_counts"] == [6, 5]
    assert meta["splits"]["test"]["class_counts"] == [2, 2]
    assert meta["folder"]["test_split"] == "test/ folder" and meta["folder"]["skipped"] == 0
    rows = _files_csv(tmp_path / "out")
    for split in data.SPLITS:
        images, labels = _records(tmp_path / "out", split, meta["image_shape"])
        listed = [r for r in rows if r["split"] == split]
        assert [int(r["label"]) for r in listed] == labels.tolist()
        for image, row in zip(images, listed, strict=True):
            with open(row["path"], "rb") as f:
                assert row["sha256"] == hashlib.sha256(f.read()).hexdigest()
            expected = image_files.fit(sources[row["path"]], 32, "stretch").astype(int)
            worst = 6 if row["path"].endswith(".jpeg") else 1  # Pillow's JPEG decoder differs
            assert np.abs(image.astype(int) - expected).max() <= worst, row["path"]
    pixels = np.concatenate([_records(tmp_path / "out", "train", [32, 32, 3])[0]]) / 255.0
    assert meta["splits"]["train"]["pixel_mean"] == pytest.approx(pixels.mean(), abs=1e-12)
    assert meta["splits"]["train"]["pixel_std"] == pytest.approx(pixels.std(), abs=1e-12)
    assert sorted(ingest.outputs(meta)) == sorted(
        ["metadata.json", "skipped.csv", "files.csv", "train-00000-of-00001.tfrecord",
         "test-00000-of-00001.tfrecord"])


def test_folder_options_size_grey_pad(tmp_path):
    _mixed_folder(tmp_path / "src")
    options = data.FolderOptions(image_size=20, channels=1, resize="pad")
    meta = ingest.ingest("image_folder", tmp_path / "out", str(tmp_path / "src"), options,
                         progress=False)
    assert meta["image_shape"] == [20, 20, 1]
    assert meta["folder"]["policy"] == {"height": 20, "width": 20, "channels": 1,
                                        "resize": "pad"}
    assert meta["folder"]["options"]["resize"] == "pad"
    images, _ = _records(tmp_path / "out", "test", [20, 20, 1])
    assert images.shape == (4, 20, 20, 1)


def test_skipped_files_are_listed_and_counted(tmp_path, caplog):
    image_files.class_folders(tmp_path / "src", {"train": {"a": 3, "b": 3},
                                                 "test": {"a": 2, "b": 2}})
    train_a = tmp_path / "src" / "train" / "a"
    good = (train_a / "000.png").read_bytes()
    (train_a / "cut.png").write_bytes(good[: len(good) // 2])
    (train_a / "notes.png").write_text("not an image")
    (train_a / ".hidden.png").write_bytes(good)
    (train_a / "zero.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        meta = ingest.ingest("image_folder", tmp_path / "out", str(tmp_path / "src"),
                             progress=False)
    with open(tmp_path / "out" / ingest.SKIPPED, newline="") as f:
        rows = {(r["split"], r["path"].rsplit("/", 1)[1]): r["reason"]
                for r in csv.DictReader(f)}
    assert set(rows) == {("train", n) for n in ("cut.png", "notes.png", ".hidden.png",
                                                "zero.png")}
    assert rows[("train", "notes.png")] == ("undecodable: Unknown image file format. One of "
                                            "JPEG, JPEG XL, PNG, GIF, BMP, WebP required.")
    assert rows[("train", "cut.png")].startswith("undecodable: ")
    assert rows[("train", "zero.png")] == "empty: 0 bytes"
    assert meta["folder"]["skipped"] == 4
    assert meta["folder"]["skipped_reasons"] == {"empty": 1, "hidden": 1, "undecodable": 2}
    assert meta["splits"]["train"]["class_counts"] == [3, 3]
    assert "4 files skipped (empty: 1, hidden: 1, undecodable: 2)" in caplog.text


def test_exact_duplicates_between_train_and_test_are_reported(tmp_path, caplog):
    image_files.class_folders(tmp_path / "src", {"train": {"a": 3, "b": 3},
                                                 "test": {"a": 2, "b": 2}})
    src = tmp_path / "src"
    shutil.copy(src / "train" / "b" / "002.png", src / "test" / "b" / "copy.png")
    shutil.copy(src / "train" / "b" / "002.png", src / "train" / "a" / "same.png")
    with caplog.at_level(logging.WARNING):
        meta = ingest.ingest("image_folder", tmp_path / "out", str(src), progress=False)
    sha256 = hashlib.sha256((src / "test" / "b" / "copy.png").read_bytes()).hexdigest()
    assert meta["duplicates"] == {"train_test": 1, "pairs": [
        {"sha256": sha256, "train": str(src / "train" / "a" / "same.png"),
         "test": str(src / "test" / "b" / "copy.png")}]}
    assert "1 test images are exact copies of training images (leakage" in caplog.text


def test_a_class_emptied_by_skipped_files_is_refused(tmp_path):
    image_files.class_folders(tmp_path / "src", {"train": {"a": 3, "b": 3},
                                                 "test": {"a": 2, "b": 2}})
    (tmp_path / "src" / "test" / "b" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(data.DataError) as raised:
        ingest.ingest("image_folder", tmp_path / "out", str(tmp_path / "src"), progress=False)
    assert str(raised.value) == (
        f"class 'b' has 1 usable image in the test split of {tmp_path / 'src'}; each class "
        "needs at least 2 per split: add images of it (ingest/skipped.csv lists files left "
        "out), or remove the class")
    assert not (tmp_path / "out").exists()


def test_on_bad_file_fail_stops_at_a_decoding_failure(tmp_path):
    image_files.class_folders(tmp_path / "src", {"train": {"a": 3, "b": 3},
                                                 "test": {"a": 2, "b": 2}})
    bad = tmp_path / "src" / "train" / "b" / "bad.png"
    bad.write_bytes(b"GIF89a rubbish")
    options = data.FolderOptions(on_bad_file="fail")
    with pytest.raises(data.DataError, match=rf"^{bad}: undecodable: .* --on_bad_file=skip"):
        ingest.ingest("image_folder", tmp_path / "out", str(tmp_path / "src"), options,
                      progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]


def test_unreadable_file_is_skipped():
    """A file its reader may not open. Permissions do not stop root: as root, the ingest
    runs as nobody (a folder under /tmp, which nobody can reach)."""
    base = pathlib.Path(tempfile.mkdtemp())
    try:
        image_files.class_folders(base / "src", {"train": {"a": 2, "b": 3},
                                                 "test": {"a": 2, "b": 2}})
        for path in [base, *base.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o644)
        secret = base / "src" / "train" / "b" / "002.png"
        secret.chmod(0)
        as_nobody = os.geteuid() == 0
        if as_nobody:
            os.seteuid(65534)
        try:
            meta = ingest.ingest("image_folder", base / "out", str(base / "src"),
                                 progress=False)
        finally:
            if as_nobody:
                os.seteuid(0)
        with open(base / "out" / ingest.SKIPPED, newline="") as f:
            rows = [(r["path"], r["reason"]) for r in csv.DictReader(f)]
        assert rows == [(str(secret), "unreadable: Permission denied")]
        assert meta["splits"]["train"]["class_counts"] == [2, 2]
    finally:
        shutil.rmtree(base)


def test_manifest_ingest(tmp_path):
    image_files.class_folders(tmp_path / "imgs", {"": {"x": 4, "y": 4}})
    rows = ["path,label,split"] + [
        f"imgs/{c}/{i:03d}.png,{c},{'test' if i >= 2 else 'train'}" for c in "xy"
        for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    options = data.FolderOptions(manifest=str(tmp_path / "labels.csv"))
    meta = ingest.ingest("image_folder", tmp_path / "out", options=options, progress=False)
    assert meta["folder"]["layout"] == "manifest" and meta["class_names"] == ["x", "y"]
    assert meta["splits"]["test"]["class_counts"] == [2, 2]
    assert meta["sources"][0]["source"] == f"image_folder:{tmp_path}"


def test_progress_bar(tmp_path, capsys):
    image_files.class_folders(tmp_path / "src", {"train": {"a": 2, "b": 2},
                                                 "test": {"a": 2, "b": 2}})
    ingest.ingest("image_folder", tmp_path / "out", str(tmp_path / "src"))
    err = capsys.readouterr().err
    assert "ingest: 100%" in err and "8/8" in err


def test_run_takes_the_folder_options_from_the_config(tmp_path):
    import types

    image_files.class_folders(tmp_path / "src", {"train": {"a": 2, "b": 2},
                                                 "test": {"a": 2, "b": 2}})
    section = types.SimpleNamespace(dataset="image_folder", data_dir=str(tmp_path / "src"),
                                    folder=data.FolderOptions(image_size=8, channels=1))
    config = types.SimpleNamespace(data=section)
    outputs = ingest.run(config, tmp_path / "out", {})
    assert "files.csv" in outputs and "skipped.csv" in outputs
    assert Examples(tmp_path / "out").image_shape == [8, 8, 1]
