"""Image files for the data tests, written with Pillow, and the numpy references of what the
image policy must make of them (bilinear resize, luma, stretch/pad/crop)."""

import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    """Encoded bytes of uint8 [H, W] / [H, W, C] (or uint16 [H, W] for 16-bit PNG)."""
    image = Image.fromarray(pixels if pixels.ndim == 2 or pixels.shape[-1] > 1
                            else pixels[..., 0])
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def write(path: pathlib.Path, pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None,
          **save) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(pixels, fmt, mode, **save))
    return path


def noise(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def smooth(rng: np.random.Generator, height: int, width: int, channels: int = 3
           ) -> np.ndarray:
    """A gradient: JPEG keeps it within a few levels."""
    y, x = np.mgrid[0:height, 0:width]
    base = (x * rng.uniform(0.5, 2) + y * rng.uniform(0.5, 2))[..., None]
    return np.clip(base + rng.uniform(0, 120, channels), 0, 255).astype(np.uint8)


def class_folders(root: pathlib.Path, counts: dict[str, dict[str, int]], seed: int = 0,
                  sides: tuple[int, int] = (8, 40)) -> dict[str, np.ndarray]:
    """root/<split>/<class>/<i>.png of random sizes: {path: pixels}. `counts`:
    {split: {class: images}}; split "" writes root/<class>/."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, classes in counts.items():
        for name, n in classes.items():
            for i in range(n):
                h, w = (int(v) for v in rng.integers(sides[0], sides[1], 2))
                pixels = noise(rng, h, w)
                path = write(root / split / name / f"{i:03d}.png", pixels)
                written[str(path)] = pixels
    return written


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit grey) and whose data is tiny."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------- references

def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of float [H, W, C] to [height, width, C], no
    antialiasing (tf.image.resize's "bilinear"), written out in numpy."""
    h, w = image.shape[:2]

    def weights(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = weights(h, height)
    c0, c1, fc = weights(w, width)
    fc = fc[None, :, None]
    top = image[r0][:, c0] * (1 - fc) + image[r0][:, c1] * fc
    bottom = image[r1][:, c0] * (1 - fc) + image[r1][:, c1] * fc
    return top * (1 - fr[:, None, None]) + bottom * fr[:, None, None]


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0, 255)).astype(np.uint8)


def fit(image: np.ndarray, size: int, resize: str) -> np.ndarray:
    """The documented policy, by hand: uint8 [H, W, C] -> uint8 [size, size, C]."""
    h, w = image.shape[:2]
    pixels = image.astype(np.float64)
    if resize == "stretch":
        return to_uint8(bilinear(pixels, size, size))
    if resize == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return to_uint8(bilinear(pixels[top:top + side, left:left + side], size, size))
    scale = size / max(h, w)
    new_h, new_w = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    out = np.zeros((size, size, image.shape[2]), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = to_uint8(bilinear(pixels, new_h, new_w))
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 grey of uint8 [H, W, 3] as float [H, W, 1]."""
    return (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None]
