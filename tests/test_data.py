"""sdim_tf.data: IDX files, sources, preprocessing and augmentation against numpy references."""

import gzip
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from sdim_tf import data


def _write_split(folder: pathlib.Path, images, labels, split="train", gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    stems = data._IDX_NAMES[split]
    suffix = ".gz" if gz else ""
    data.save_idx(images, folder / (stems[0] + suffix))
    data.save_idx(labels, folder / (stems[1] + suffix))


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([7, 0, 255], dtype=np.uint8),
    np.array([[-5, 70000], [1, 2]], dtype=np.int32),
])
def test_idx_round_trip(tmp_path, array, gz):
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    data.save_idx(array, path)
    back = data.load_idx(path)
    assert back.shape == array.shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_the_mnist_format(tmp_path):
    data.save_idx(np.zeros((2, 28, 28), np.uint8), tmp_path / "x")
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3])  # uint8, 3 dimensions
    assert [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(3)] == [2, 28, 28]
    assert len(raw) == 16 + 2 * 28 * 28


def test_load_idx_reads_the_real_header(data_dir):
    labels = data.load_idx(data_dir / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


def test_truncated_gzip(tmp_path):
    data.save_idx(np.zeros((10, 28, 28), np.uint8), tmp_path / "x.gz")
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match=r"x\.gz.*(corrupt|truncated)"):
        data.load_idx(tmp_path / "x.gz")


def test_truncated_payload(tmp_path):
    data.save_idx(np.zeros((10, 28, 28), np.uint8), tmp_path / "x")
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(raw[:-5])
    with pytest.raises(data.DataError, match=r"x: payload length .*truncated"):
        data.load_idx(tmp_path / "x")


def test_trailing_bytes(tmp_path):
    data.save_idx(np.zeros((3,), np.uint8), tmp_path / "x")
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes() + b"\0")
    with pytest.raises(data.DataError, match="trailing bytes"):
        data.load_idx(tmp_path / "x")


def test_wrong_magic(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x01" + bytes(8)))
    with pytest.raises(data.DataError, match=r"x\.gz: wrong magic number 0x12340801"):
        data.load_idx(tmp_path / "x.gz")


def test_short_file(tmp_path):
    (tmp_path / "x").write_bytes(b"\0\0")
    with pytest.raises(data.DataError, match="too short"):
        data.load_idx(tmp_path / "x")


def test_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_idx(tmp_path / "nope.gz")


def test_count_mismatch(tmp_path):
    _write_split(tmp_path / "mnist", np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(data.DataError, match="5 images .* but 4 labels"):
        data.load_split("mnist", "train", data_dir=str(tmp_path))


def test_missing_label_file(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    data.save_idx(np.zeros((5, 28, 28), np.uint8), folder / "train-images-idx3-ubyte.gz")
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.*missing"):
        data.load_split("mnist", "train", data_dir=str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(data.DataError, match=r"unknown dataset 'cifar100'; known: cifar10"):
        data.load_split("cifar100", "train")


def test_empty_data_dir_names_every_source(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(data.DataError, match=r"--data_dir .*: no train data for 'mnist'"):
        data.load_split("mnist", "train", data_dir=str(tmp_path))


def test_missing_data_dir(tmp_path):
    with pytest.raises(data.DataError, match="no such folder"):
        data.load_split("mnist", "train", data_dir=str(tmp_path / "absent"))


def test_no_source_message_names_all_three():
    message = data._no_source_message("mnist", "offline")
    for word in ("--data_dir", data.DATA_DIR_ENV, "tfds"):
        assert word in message


def test_raw_and_gz_files_and_env_var(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 9], np.uint8)
    _write_split(tmp_path / "mnist", images, labels, gz=False)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    got_images, got_labels = data.load_split("mnist", "train")
    np.testing.assert_array_equal(got_images[..., 0], images)
    assert got_images.shape == (6, 28, 28, 1) and got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels)


def test_tfds_source_with_mock_data(monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with tfds.testing.mock_data(num_examples=7):
        loaded = data.load_split_with_source("mnist", "test")
    assert loaded.source == "tfds:mnist"
    assert loaded.images.shape == (7, 28, 28, 1) and loaded.images.dtype == np.uint8
    assert loaded.labels.shape == (7,) and ((0 <= loaded.labels) & (loaded.labels < 10)).all()


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
                expected[(split, name, i)] = image
    loaded = data.load_split_with_source("image_folder", "test", data_dir=str(tmp_path))
    assert loaded.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(loaded.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(loaded.images[4], expected[("test", "dog", 1)])


def test_image_folder_rejects_unknown_test_class(tmp_path):
    image = tf.io.encode_png(np.zeros((4, 4, 1), np.uint8)).numpy()
    for split, name in (("train", "a"), ("test", "b")):
        (tmp_path / split / name).mkdir(parents=True)
        (tmp_path / split / name / "0.png").write_bytes(image)
    with pytest.raises(data.DataError, match=r"classes \['b'\] are not in the training"):
        data.load_split("image_folder", "test", data_dir=str(tmp_path))


def test_image_folder_undecodable(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match=r"0\.png: cannot decode"):
        data.load_split("image_folder", "train", data_dir=str(tmp_path))


def _bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize, written out in numpy."""
    h, w = image.shape

    def weights(n_in):
        src = (np.arange(size) + 0.5) * n_in / size - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = weights(h)
    c0, c1, fc = weights(w)
    top = image[r0][:, c0] * (1 - fc) + image[r0][:, c1] * fc
    bottom = image[r1][:, c0] * (1 - fc) + image[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]


def test_preprocess_resizes_bilinear_and_scales(data_dir):
    image = data.load_idx(data_dir / "fashion_mnist" / "t10k-images-idx3-ubyte.gz")[:3]
    out = data.preprocess(image[..., None]).numpy()
    assert out.shape == (3, 32, 32, 1) and out.dtype == np.float32
    for i in range(3):
        expected = _bilinear_reference(image[i].astype(np.float64) / 255.0, 32)
        np.testing.assert_allclose(out[i, ..., 0], expected, atol=1e-5)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_preprocess_keeps_32x32():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(1, 32, 32, 3)
    np.testing.assert_allclose(data.preprocess(image).numpy(), image / 255.0, atol=1e-7)


def test_augment_is_a_pad4_crop_with_flip():
    rng = np.random.default_rng(2)
    images = rng.random((64, 32, 32, 1)).astype(np.float32)
    out = data.augment(tf.constant(images), "crop_flip", tf.constant([3, 4], tf.int64)).numpy()
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
    flips = 0
    for i in range(64):
        candidates = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                      if np.array_equal(out[i], (lambda c: c[:, ::-1] if flip else c)(
                          padded[i, dy:dy + 32, dx:dx + 32]))]
        assert candidates, f"image {i} is no pad-4 crop (or flip) of its input"
        flips += candidates[0][2]
    assert 10 < flips < 54  # about half flipped
    crop_only = data.augment(tf.constant(images), "crop", tf.constant([3, 4], tf.int64))
    assert not np.array_equal(crop_only.numpy(), images)
    np.testing.assert_array_equal(data.augment(tf.constant(images), "none", None), images)


def test_make_dataset_batches_and_shuffles(fashion_ingest):
    from pipeline.run_dir import Examples

    folder, meta = fashion_ingest
    files = Examples(folder).shard_files("test")
    ds = data.make_dataset(files, meta["image_shape"], 1000, training=False)
    labels = np.concatenate([y.numpy() for _, y in ds])
    expected = data.load_split("fashion_mnist", "test")[1]
    np.testing.assert_array_equal(labels, expected)  # evaluation keeps the order
    train = data.make_dataset(files, meta["image_shape"], 128, training=True,
                              augmentation="crop_flip", seed=5, limit=1000)
    epochs = [np.concatenate([y.numpy() for _, y in train]) for _ in range(2)]
    assert len(epochs[0]) == 896  # 7 full batches; the incomplete one is dropped
    assert not np.array_equal(epochs[0], epochs[1])  # a new order every epoch
