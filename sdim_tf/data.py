"""Datasets: registry, sources (IDX files, image folders, tfds), preprocessing, tf.data.

One preprocessing function (`preprocess`) serves training, calibration and the exported
SavedModel, so what the model sees in production is what it saw in training.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
import tensorflow as tf

IMAGE_SIZE = 32  # the paper resizes every dataset to 32x32 (appendix B.1)
PAD = 4  # pad-and-crop augmentation of He et al. (2016)

DATA_DIR_ENV = "SDIM_DATA_DIR"
SPLITS = ("train", "test")
AUGMENTATIONS = ("none", "crop", "crop_flip")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


class DataError(ValueError):
    """Bad or missing data; the message names the file or dataset and the defect."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about a dataset before reading it."""

    name: str
    num_classes: Optional[int]  # None: read from the data (image_folder)
    channels: Optional[int]
    class_names: Optional[tuple[str, ...]]
    source_size: Optional[tuple[int, int]]  # (height, width) of the stored images
    augmentation: str  # one of AUGMENTATIONS, applied to training batches only
    tfds_name: Optional[str] = None
    idx: bool = False  # distributed as MNIST-format IDX files


_DIGITS = tuple(str(i) for i in range(10))

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, 1, _DIGITS, (28, 28), "none", "mnist", idx=True),
    # The authors' code trains Fashion-MNIST with pad-4 crop + horizontal flip (the paper's
    # B.1 lists no augmentation for it); with it their model reaches 95.1%, so we follow the code.
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", 10, 1,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        (28, 28), "crop_flip", "fashion_mnist", idx=True),
    "cifar10": DatasetSpec(
        "cifar10", 10, 3,
        ("airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"),
        (32, 32), "crop_flip", "cifar10"),
    "svhn_cropped": DatasetSpec("svhn_cropped", 10, 3, _DIGITS, (32, 32), "crop_flip",
                                "svhn_cropped"),
    # The user's own data: <data_dir>/train/<class>/*.png and <data_dir>/test/<class>/*.png.
    "image_folder": DatasetSpec("image_folder", None, None, None, None, "none"),
}


def get_spec(name: str) -> DatasetSpec:
    """Returns the registry entry of `name`, or a DataError listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


# ---------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an MNIST-format IDX file (gzip-compressed or raw) into a numpy array.

    Validates the magic number, the dimensions and that the payload length matches them.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: wrong magic number 0x{raw[:4].hex()} (not an IDX file)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: payload length {len(raw) - header} does not match dimensions {dims} "
            f"({'truncated' if len(raw) < expected else 'trailing bytes'})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(
        dtype.newbyteorder("="))


def save_idx(array: np.ndarray, path: str | os.PathLike) -> None:
    """Writes `array` as an IDX file (gzip when `path` ends in .gz); used to make test data."""
    codes = {np.dtype(v).newbyteorder(">"): k for k, v in _IDX_DTYPES.items()}
    codes[np.dtype(np.uint8)] = 0x08
    codes[np.dtype(np.int8)] = 0x09
    big = np.asarray(array).astype(np.asarray(array).dtype.newbyteorder(">"))
    code = codes[big.dtype]
    payload = (bytes([0, 0, code, big.ndim])
               + b"".join(int(d).to_bytes(4, "big") for d in big.shape) + big.tobytes())
    path = pathlib.Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


_IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(folder: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def idx_files(folder: pathlib.Path, split: str) -> Optional[tuple[pathlib.Path, pathlib.Path]]:
    """The (images, labels) IDX files of `split` in `folder`, or None when absent."""
    images, labels = (_find(folder, stem) for stem in _IDX_NAMES[split])
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = _IDX_NAMES[split][0 if images is None else 1]
        raise DataError(f"{folder}: {missing}[.gz] is missing")
    return images, labels


def _load_idx_split(folder: pathlib.Path, split: str):
    files = idx_files(folder, split)
    if files is None:
        return None
    images, labels = (load_idx(f) for f in files)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise DataError(f"{files[0]}: expected uint8 images [N, H, W(, C)], got "
                        f"{images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{files[1]}: expected labels [N], got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images in {files[0].name} but "
                        f"{len(labels)} labels in {files[1].name}")
    if images.ndim == 3:
        images = images[..., None]
    return images, labels.astype(np.int64), list(files)


# ------------------------------------------------------------------------ image folders

def _class_folders(split_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir())


def _load_image_folder_split(root: pathlib.Path, split: str,
                             class_names: Optional[Sequence[str]] = None):
    split_dir = root / split
    if not split_dir.is_dir():
        return None
    folders = _class_folders(split_dir)
    if not folders:
        raise DataError(f"{split_dir}: no class sub-folders (expected {split}/<class>/*.png)")
    names = [f.name for f in folders] if class_names is None else list(class_names)
    unknown = sorted({f.name for f in folders} - set(names))
    if unknown:
        raise DataError(f"{split_dir}: classes {unknown} are not in the training classes")
    images, labels, files = [], [], []
    for folder in folders:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        for path in paths:
            try:
                image = tf.io.decode_image(path.read_bytes(), expand_animations=False).numpy()
            except (tf.errors.InvalidArgumentError, OSError) as e:
                raise DataError(f"{path}: cannot decode image ({e})") from None
            if images and image.shape != images[0].shape:
                raise DataError(f"{path}: shape {image.shape} differs from {files[0]}'s "
                                f"{images[0].shape}; all images must share one size")
            images.append(image)
            labels.append(names.index(folder.name))
            files.append(path)
    if not images:
        raise DataError(f"{split_dir}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int64), files, names


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """Class names of an image folder: the sorted sub-folders of its train/ split."""
    split_dir = pathlib.Path(root) / "train"
    if not split_dir.is_dir():
        raise DataError(f"{root}: no train/ folder (expected train/<class>/*.png)")
    return [f.name for f in _class_folders(split_dir)]


# -------------------------------------------------------------------------------- tfds

def _load_tfds(spec: DatasetSpec, split: str, allow_download: bool = True):
    import tensorflow_datasets as tfds  # heavy; only this source needs it

    last_error = None
    # A prepared dataset never touches the network.
    for download in (False, True) if allow_download else (False,):
        try:
            ds = tfds.load(spec.tfds_name, split=split, as_supervised=True,
                           download=download)
            # Batches of 10k, not batch_size=-1 (which aborts on tfds' mock generator).
            batches = list(tfds.as_numpy(ds.batch(10_000)))
            return (np.concatenate([b[0] for b in batches]).astype(np.uint8),
                    np.concatenate([b[1] for b in batches]).astype(np.int64))
        except Exception as e:  # tfds raises several unrelated types when data is missing
            last_error = e
    raise DataError(_no_source_message(spec.name, f"tfds failed: {last_error}"))


def _no_source_message(name: str, detail: str) -> str:
    return (f"no source for dataset {name!r}: pass --data_dir (a folder holding "
            f"{name}/train-images-idx3-ubyte.gz etc., or {name}/train/<class>/ images), set "
            f"{DATA_DIR_ENV} to such a folder, or let tfds download it ({detail})")


@dataclasses.dataclass
class Split:
    """One split of a dataset as arrays, with where it came from."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    source: str  # "idx:<folder>", "image_folder:<folder>" or "tfds:<name>"
    files: list[pathlib.Path]
    class_names: Optional[list[str]] = None


def load_split_with_source(name: str, split: str, data_dir: Optional[str] = None,
                           allow_download: bool = True) -> Split:
    """Like `load_split`, also saying where the data came from (for ingest metadata).

    `allow_download=False` never lets tfds reach the network (optional data, e.g. OOD sets).
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    candidates = []
    if data_dir is not None:
        candidates.append((pathlib.Path(data_dir), True))
    if os.environ.get(DATA_DIR_ENV):
        # Absolute, so the recorded source names the folder whatever the reader's cwd.
        candidates.append((pathlib.Path(os.environ[DATA_DIR_ENV]).resolve(), False))
    for folder, explicit in candidates:
        if explicit and not folder.is_dir():
            raise DataError(f"--data_dir {folder}: no such folder")
        if spec.name == "image_folder":
            root = folder
            classes = image_folder_classes(root) if split != "train" else None
            loaded = _load_image_folder_split(root, split, classes)
            if loaded is not None:
                return Split(loaded[0], loaded[1], f"image_folder:{root}", loaded[2],
                             loaded[3])
        else:
            root = folder / spec.name
            if root.is_dir():
                loaded = _load_idx_split(root, split)
                if loaded is not None:
                    return Split(loaded[0], loaded[1], f"idx:{root}", loaded[2])
                loaded = _load_image_folder_split(root, split, spec.class_names)
                if loaded is not None:
                    return Split(loaded[0], loaded[1], f"image_folder:{root}", loaded[2],
                                 loaded[3])
        if explicit:  # the user pointed at this folder: do not fall back silently
            raise DataError(f"--data_dir {folder}: no {split} data for {name!r} "
                            f"(expected {name}/{_IDX_NAMES[split][0]}.gz or "
                            f"{name}/{split}/<class>/ images)")
    if spec.tfds_name is None:
        raise DataError(f"dataset {name!r} is read from a folder: pass --data_dir or set "
                        f"{DATA_DIR_ENV} to a folder holding train/<class>/ and test/<class>/")
    images, labels = _load_tfds(spec, split, allow_download)
    return Split(images, labels, f"tfds:{spec.tfds_name}", [])


def load_split(name: str, split: str, data_dir: Optional[str] = None,
               allow_download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(images uint8 [N,H,W,C], labels int64 [N])` of a dataset split.

    Sources, in order: `data_dir`, the SDIM_DATA_DIR environment variable (each a folder
    holding `<name>/train-images-idx3-ubyte.gz` etc.), then tfds (prepared data first, a
    download only when missing). An explicit `data_dir` that lacks the data is an error.
    """
    loaded = load_split_with_source(name, split, data_dir, allow_download)
    return loaded.images, loaded.labels


# ----------------------------------------------------------------- preprocessing and tf.data

def preprocess(images: tf.Tensor, image_size: int = IMAGE_SIZE) -> tf.Tensor:
    """uint8 [N,H,W,C] -> float32 [N,32,32,C] in [0, 1]: bilinear resize, no normalisation."""
    images = tf.convert_to_tensor(images)
    images = tf.cast(images, tf.float32) / 255.0 if images.dtype == tf.uint8 else tf.cast(
        images, tf.float32)
    if images.shape[1] != image_size or images.shape[2] != image_size:
        images = tf.image.resize(images, (image_size, image_size), method="bilinear")
        images = tf.clip_by_value(images, 0.0, 1.0)
    return images


def image_batches(images: np.ndarray, batch_size: int = 500) -> tf.data.Dataset:
    """(preprocessed images, dummy labels) batches of uint8 source or float [0, 1] images."""
    return tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(
        lambda x: (preprocess(x), tf.zeros(tf.shape(x)[:1], tf.int64)))


def augment(images: tf.Tensor, kind: str, seed: tf.Tensor) -> tf.Tensor:
    """Batched pad-4 random crop (+ horizontal flip) with a stateless seed [2]."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; known: {AUGMENTATIONS}")
    if kind == "none":
        return images
    batch = tf.shape(images)[0]
    size = images.shape[1]
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    offsets = tf.random.stateless_uniform([batch, 2], seed, 0, 2 * PAD + 1, tf.int32)
    rows = offsets[:, :1] + tf.range(size)[None]
    cols = offsets[:, 1:] + tf.range(size)[None]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    images = tf.gather(images, cols, axis=2, batch_dims=1)
    if kind == "crop_flip":
        flip = tf.random.stateless_uniform([batch], seed + 1) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, [2]), images)
    return images


FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "channels": tf.io.FixedLenFeature([], tf.int64),
}


def serialize_example(image: np.ndarray, label: int) -> bytes:
    """One `tf.train.Example`: raw uint8 image bytes, label, height, width, channels."""
    h, w, c = image.shape
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[h])),
        "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[w])),
        "channels": tf.train.Feature(int64_list=tf.train.Int64List(value=[c])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_examples(serialized: tf.Tensor, shape: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of serialized examples -> (uint8 images [N, *shape], int64 labels [N])."""
    parsed = tf.io.parse_example(serialized, FEATURES)
    images = tf.io.decode_raw(parsed["image"], tf.uint8)
    return tf.reshape(images, [-1, *shape]), parsed["label"]


def make_dataset(files: Sequence[str], shape: Sequence[int], batch_size: int, *,
                 training: bool, augmentation: str = "none", seed: int = 0,
                 limit: Optional[int] = None, skip: int = 0, image_size: int = IMAGE_SIZE,
                 drop_remainder: Optional[bool] = None, repeat: bool = False,
                 indices: Optional[Sequence[int]] = None) -> tf.data.Dataset:
    """TFRecords -> batches of (float32 images [B,32,32,C] in [0,1], int64 labels [B]).

    `skip` then `limit` select examples in file order; or `indices`, their positions in file
    order (a held-out share of each class). Training: shuffled with `seed` (a new
    order each epoch), augmented per batch with a stateless seed drawn from (seed, batch
    index), incomplete last batch dropped.
    `repeat=True` gives an endless stream whose batch index (and so augmentation) keeps
    counting across epochs.
    """
    if not files:
        raise DataError("no TFRecord files given to make_dataset")
    ds = tf.data.TFRecordDataset(list(files), num_parallel_reads=1)
    if skip:
        ds = ds.skip(skip)
    if limit is not None:
        ds = ds.take(limit)
    if indices is not None:
        keep = np.zeros(max(indices, default=-1) + 1, bool)
        keep[np.asarray(indices, np.int64)] = True
        mask = tf.constant(keep)
        ds = ds.take(len(keep)).enumerate().filter(
            lambda i, _: tf.gather(mask, i)).map(lambda _, example: example)
    # Parse in chunks (fast, vectorised), then cache the small uint8 arrays.
    ds = ds.batch(1024).map(lambda s: parse_examples(s, shape),
                            num_parallel_calls=tf.data.AUTOTUNE).unbatch().cache()
    if training:
        ds = ds.shuffle(60_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=training if drop_remainder is None
                  else drop_remainder)

    def _prepare(index, batch):
        images, labels = batch
        images = preprocess(images, image_size)
        if training:
            images = augment(images, augmentation, tf.stack(
                [tf.cast(seed, tf.int64), index]))
        return images, labels

    ds = ds.enumerate().map(_prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
