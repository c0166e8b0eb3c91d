"""MNIST-format IDX files: reading (validated), writing (to make test data), finding."""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import Optional

import numpy as np

from sdim_tf.data.registry import DataError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}
# (images, labels) file stems per split, as MNIST and Fashion-MNIST are distributed
IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


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


def _find(folder: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def idx_files(folder: pathlib.Path, split: str) -> Optional[tuple[pathlib.Path, pathlib.Path]]:
    """The (images, labels) IDX files of `split` in `folder`, or None when absent."""
    images, labels = (_find(folder, stem) for stem in IDX_NAMES[split])
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = IDX_NAMES[split][0 if images is None else 1]
        raise DataError(f"{folder}: {missing}[.gz] is missing")
    return images, labels


def load_idx_split(folder: pathlib.Path, split: str
                   ) -> Optional[tuple[np.ndarray, np.ndarray, list[pathlib.Path]]]:
    """(uint8 images [N, H, W, C], int64 labels [N], the two files) of `split`, or None when
    `folder` holds no IDX files of it."""
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
