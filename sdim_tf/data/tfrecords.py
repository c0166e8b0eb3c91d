"""The examples on disk: tf.train.Example in TFRecord shards, and the tf.data input pipeline
that reads them back for training and evaluation."""

from __future__ import annotations

import functools
import os
import pathlib
from collections.abc import Sequence
from typing import Optional

import numpy as np
import tensorflow as tf

from sdim_tf.data.augmentation import augment
from sdim_tf.data.preprocessing import IMAGE_SIZE, preprocess
from sdim_tf.data.registry import DataError

EXAMPLES_PER_SHARD = 20_000

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "channels": tf.io.FixedLenFeature([], tf.int64),
}
SCHEMA = {"image": "bytes: raw uint8 [height, width, channels], row-major",
          "label": "int64", "height": "int64", "width": "int64", "channels": "int64"}


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of an int64 (a negative one as its 64-bit complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _entry(key: str, feature: bytes) -> bytes:
    """One map<string, Feature> entry of tf.train.Features (key: field 1, value: field 2)."""
    return _delimited(b"\n", _delimited(b"\n", key.encode()) + _delimited(b"\x12", feature))


def _int64_feature(value: int) -> bytes:  # Feature.int64_list (3), packed Int64List.value
    return _delimited(b"\x1a", _delimited(b"\n", _varint(value)))


def _bytes_feature(value: bytes) -> bytes:  # Feature.bytes_list (1), BytesList.value (1)
    return _delimited(b"\n", _delimited(b"\n", value))


@functools.lru_cache(maxsize=64)
def _image_layout(height: int, width: int, channels: int) -> tuple[bytes, bytes]:
    """The bytes before and after the image's bytes in the entries of the features that
    precede and follow the label: (channels, height, image header), (width entry)."""
    size = height * width * channels
    image_entry = _entry("image", _bytes_feature(bytes(size)))
    head = (_entry("channels", _int64_feature(channels))
            + _entry("height", _int64_feature(height)) + image_entry[:-size])
    return head, _entry("width", _int64_feature(width))


@functools.lru_cache(maxsize=1024)
def _label_entry(label: int) -> bytes:
    return _entry("label", _int64_feature(label))


def serialize_example(image: np.ndarray, label: int) -> bytes:
    """One `tf.train.Example`: raw uint8 image bytes, label, height, width, channels.

    The bytes of `tf.train.Example.SerializeToString(deterministic=True)` (features in name
    order), written directly: protobuf's default order of a map changes from process to
    process (the same images would give other shard bytes each run), and building the
    message takes thirty times longer."""
    head, tail = _image_layout(*image.shape)
    label_entry = _label_entry(int(label))
    pixels = np.ascontiguousarray(image).tobytes()
    length = len(head) + len(pixels) + len(label_entry) + len(tail)
    # Example.features (1) holding Features.feature (1) entries
    return b"".join((b"\n", _varint(length), head, pixels, label_entry, tail))


def parse_examples(serialized: tf.Tensor, shape: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch of serialized examples -> (uint8 images [N, *shape], int64 labels [N])."""
    parsed = tf.io.parse_example(serialized, FEATURES)
    images = tf.io.decode_raw(parsed["image"], tf.uint8)
    return tf.reshape(images, [-1, *shape]), parsed["label"]


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def num_shards(num_examples: int, per_shard: int = EXAMPLES_PER_SHARD) -> int:
    return max(1, -(-num_examples // per_shard))


class ShardWriter:
    """Writes one split's serialized examples, `per_shard` to a shard, in the order given;
    the shards get their final names (`<split>-00000-of-00003.tfrecord`) at `close`, once
    their number is known."""

    def __init__(self, folder: str | os.PathLike, split: str,
                 per_shard: int = EXAMPLES_PER_SHARD):
        self.folder, self.split, self.per_shard = pathlib.Path(folder), split, per_shard
        self._partial: list[pathlib.Path] = []
        self._writer: Optional[tf.io.TFRecordWriter] = None
        self._in_shard = 0

    def write(self, example: bytes) -> None:
        if self._writer is None or self._in_shard == self.per_shard:
            self._next_shard()
        self._writer.write(example)
        self._in_shard += 1

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.folder / f".{self.split}-{len(self._partial):05d}.partial"
        self._partial.append(path)
        self._writer = tf.io.TFRecordWriter(str(path))
        self._in_shard = 0

    def close(self) -> list[str]:
        """The shard names, in order (one empty shard when nothing was written)."""
        if self._writer is None:
            self._next_shard()
        self._writer.close()
        names = [shard_name(self.split, i, len(self._partial))
                 for i in range(len(self._partial))]
        for path, name in zip(self._partial, names, strict=True):
            path.rename(self.folder / name)
        return names


def write_shards(folder: str | os.PathLike, split: str, images: np.ndarray,
                 labels: np.ndarray) -> list[str]:
    """Writes in-memory uint8 images [N, H, W, C] and their labels as `split`'s shards."""
    writer = ShardWriter(folder, split)
    for image, label in zip(images, labels, strict=True):
        writer.write(serialize_example(image, label))
    return writer.close()


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
