"""sdim_tf.data: IDX files, sources, preprocessing and augmentation against numpy references."""

import dataclasses
import gzip
import http.server
import pathlib
import socket
import threading

import numpy as np
import pytest
import tensorflow as tf

from sdim_tf import data
from sdim_tf.data import tfds_source
from tests import image_files


def _write_split(folder: pathlib.Path, images, labels, split="train", gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    stems = data.IDX_NAMES[split]
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


def test_empty_data_dir_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(data.DataError) as raised:
        data.load_split("mnist", "train", data_dir=str(tmp_path))
    assert str(raised.value) == (
        f"--data_dir {tmp_path}: no data for 'mnist' (expected FOLDER/mnist/"
        "{train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz}} with FOLDER={tmp_path})")


def test_idx_folder_without_the_test_split(tmp_path):
    _write_split(tmp_path / "mnist", np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8))
    data.load_split("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match=r"mnist: no test data \(expected t10k-images"):
        data.load_split("mnist", "test", data_dir=str(tmp_path))


def test_missing_data_dir(tmp_path):
    with pytest.raises(data.DataError, match="no such folder"):
        data.load_split("mnist", "train", data_dir=str(tmp_path / "absent"))


def test_no_source_message_names_the_sources_and_the_layout():
    message = tfds_source.no_source_message(data.get_spec("cifar10"), "offline")
    for words in ("--data_dir=FOLDER", f"{data.DATA_DIR_ENV}=FOLDER", "tfds",
                  "FOLDER/cifar10/train/<class>/*.png and FOLDER/cifar10/test/<class>/*.png"):
        assert words in message


def test_sdim_data_dir_naming_no_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(data.DataError) as raised:
        data.load_split("fashion_mnist", "test")
    text = str(raised.value)
    assert text.startswith(f"{data.DATA_DIR_ENV}={tmp_path / 'absent'}: no such folder; unset")
    assert "FOLDER/fashion_mnist/{train-images-idx3-ubyte.gz" in text and "\n" not in text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_tells_an_answer_from_none():
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)  # any answer: the server is reachable
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert tfds_source.unreachable(f"http://127.0.0.1:{server.server_port}/x") == ""
    finally:
        server.shutdown()
    port = _closed_port()
    assert tfds_source.unreachable(f"http://127.0.0.1:{port}/") == (
        f"127.0.0.1:{port} unreachable: ConnectionError")


def test_download_without_network_fails_before_tfds_starts(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # nothing prepared there
    port = _closed_port()
    spec = dataclasses.replace(data.DATASETS["mnist"], download_url=f"http://127.0.0.1:{port}/")
    monkeypatch.setitem(data.DATASETS, "mnist", spec)
    with pytest.raises(data.DataError) as raised:
        data.load_split("mnist", "test")
    text = str(raised.value)
    assert f"tfds cannot download it: 127.0.0.1:{port} unreachable" in text
    assert "FOLDER/mnist/{train-images-idx3-ubyte.gz" in text and "--data_dir=FOLDER" in text
    assert not any(tmp_path.rglob("*")), "tfds started a download"


def test_image_folder_needs_a_folder(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, "/work")  # never read for your own images
    with pytest.raises(data.DataError, match=r"'image_folder' reads your own folder: pass "
                                             r"--data_dir=DIR; expected DIR/train/<class>"):
        data.load_split("image_folder", "train")


def test_a_registered_dataset_as_image_folders(tmp_path):
    """mnist as PNG class folders: read at its own 28x28 grey, pixels unchanged."""
    rng = np.random.default_rng(0)
    expected = {}
    for split in data.SPLITS:
        for digit in data.get_spec("mnist").class_names:
            for i in range(2):
                pixels = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
                path = tmp_path / "mnist" / split / digit / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tf.io.encode_png(pixels).numpy())
                expected[(split, digit, i)] = pixels
    loaded = data.load_split_with_source("mnist", "test", data_dir=str(tmp_path))
    assert loaded.source == f"image_folder:{tmp_path / 'mnist'}"
    np.testing.assert_array_equal(loaded.labels, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(loaded.images[15], expected[("test", "7", 1)])


@pytest.mark.parametrize("shape", [(1, 1, 1), (28, 28, 1), (32, 32, 3), (200, 96, 3)])
@pytest.mark.parametrize("label", [0, 9, 127, 128, 300, 2**40, -1])
def test_serialize_example_is_protobuf_s_deterministic_serialization(shape, label):
    image = np.random.default_rng(label % 7).integers(0, 256, shape, dtype=np.uint8)
    h, w, c = shape
    ints = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
    reference = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": ints(label), "height": ints(h), "width": ints(w), "channels": ints(c)}))
    serialized = data.serialize_example(image, label)
    assert serialized == reference.SerializeToString(deterministic=True)
    images, labels = data.parse_examples(tf.constant([serialized]), shape)
    np.testing.assert_array_equal(images.numpy()[0], image)
    assert labels.numpy()[0] == label


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


def test_image_folder_same_size_pixels_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
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


def test_image_folder_mixed_sizes_are_resized(tmp_path):
    rng = np.random.default_rng(2)
    sources = {}
    for split in data.SPLITS:
        for name in ("a", "b"):
            for i, shape in enumerate([(20, 45, 3), (32, 32, 3)]):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                path = tmp_path / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tf.io.encode_png(pixels).numpy())
                sources[(split, name, i)] = pixels
    loaded = data.load_split_with_source("image_folder", "train", data_dir=str(tmp_path))
    assert loaded.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(loaded.images[3], sources[("train", "b", 1)])
    expected = image_files.fit(sources[("train", "a", 0)], 32, "stretch")
    assert np.abs(loaded.images[0].astype(int) - expected).max() <= 1


def test_image_folder_skips_an_undecodable_file(tmp_path):
    rng = np.random.default_rng(3)
    for split in data.SPLITS:
        for name in ("a", "b"):
            for i in range(2):
                path = tmp_path / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tf.io.encode_png(rng.integers(0, 256, (4, 4, 3),
                                                               dtype=np.uint8)).numpy())
    (tmp_path / "train" / "a" / "2.png").write_bytes(b"not a png")
    loaded = data.load_split_with_source("image_folder", "train", data_dir=str(tmp_path))
    assert [p.name for p in loaded.files] == ["0.png", "1.png", "0.png", "1.png"]
    strict = data.FolderOptions(on_bad_file="fail")
    with pytest.raises(data.DataError, match=r"2\.png: undecodable: .*--on_bad_file=skip"):
        data.load_split_with_source("image_folder", "train", str(tmp_path), options=strict)


def test_preprocess_resizes_bilinear_and_scales(data_dir):
    image = data.load_idx(data_dir / "fashion_mnist" / "t10k-images-idx3-ubyte.gz")[:3]
    out = data.preprocess(image[..., None]).numpy()
    assert out.shape == (3, 32, 32, 1) and out.dtype == np.float32
    for i in range(3):
        expected = image_files.bilinear(image[i, ..., None].astype(np.float64) / 255.0, 32, 32)
        np.testing.assert_allclose(out[i], expected, atol=1e-5)
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
