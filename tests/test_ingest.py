"""Ingest stage on the real Fashion-MNIST and on broken inputs."""

import numpy as np
import pytest
import tensorflow as tf

from pipeline import artifacts
from pipeline.run_dir import Examples
from pipeline.stages import ingest
from sdim_tf import data


def test_real_fashion_mnist_counts_and_statistics(fashion_ingest):
    folder, meta = fashion_ingest
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    assert (train["num_examples"], test["num_examples"]) == (60000, 10000)
    assert train["class_counts"] == [6000] * 10 and test["class_counts"] == [1000] * 10
    assert abs(train["pixel_mean"] - 0.286) < 0.001
    assert meta["image_shape"] == [28, 28, 1] and meta["num_classes"] == 10
    assert meta["class_names"][9] == "Ankle boot"
    on_disk = artifacts.read_json(folder / Examples.METADATA)
    assert on_disk["splits"]["test"]["class_counts"] == [1000] * 10
    for source in meta["sources"]:
        for f in source["files"]:
            assert f["sha256"] == artifacts.sha256_file(f["path"])


def test_records_hold_the_source_images(fashion_ingest, data_dir):
    folder, meta = fashion_ingest
    images, labels = data.load_split("fashion_mnist", "test", data_dir=str(data_dir))
    records = tf.data.TFRecordDataset(Examples(folder).shard_files("test")).batch(10000)
    got_images, got_labels = data.parse_examples(next(iter(records)), meta["image_shape"])
    np.testing.assert_array_equal(got_images.numpy(), images)
    np.testing.assert_array_equal(got_labels.numpy(), labels)


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
        stems = data._IDX_NAMES[split]
        data.save_idx(np.full((3, 28, 28), 9, np.uint8), src / (stems[0] + ".gz"))
        data.save_idx(np.array([0, 1, 2], np.uint8), src / (stems[1] + ".gz"))
    out = tmp_path / "out"
    first = ingest.ingest("mnist", out, data_dir=str(tmp_path / "src"))
    data.save_idx(np.array([0, 1, 12], np.uint8), src / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match=r"label 12 outside \[0, 10\)"):
        ingest.ingest("mnist", out, data_dir=str(tmp_path / "src"))
    assert artifacts.read_json(out / Examples.METADATA) == first
