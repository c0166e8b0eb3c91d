"""One image file -> one example: read, decode, bring to the model's input, serialize.

The policy (`ImagePolicy`), applied to every image of a dataset:

- channels: decoded to grey (1) or colour (3) by TensorFlow's own decoders, as the exported
  model's `classify_encoded` decodes: colour to grey by luma (0.299 R + 0.587 G + 0.114 B),
  grey to colour by repetition, alpha dropped, palettes expanded, 16-bit samples truncated
  to their high byte. (GIF and BMP decode to colour first.)
- size: `stretch` resizes to height x width whatever the aspect ratio (what the exported
  model does to an image of another size); `pad` resizes the longer side to fit and pads the
  rest with black, centred; `crop` cuts the largest centred region of the target's aspect
  ratio, then resizes. Bilinear, as `preprocess`, rounded to uint8.

`ImageEncoder.encode` is the whole logic for one file; the in-process and the Beam ingest
drivers both call its pieces (`image` in the graph, `finish` for the example bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from sdim_tf import encoded
from sdim_tf.data.registry import DataError
from sdim_tf.data.tfrecords import serialize_example

RESIZE = ("stretch", "pad", "crop")
CHANNELS = (1, 3)
# Pillow modes of one (grey) channel; every other mode decodes to colour.
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """How every image is brought to the model's input (see the module docstring)."""

    height: int
    width: int
    channels: int
    resize: str = "stretch"

    def __post_init__(self):
        if self.channels not in CHANNELS:
            raise DataError(f"channels={self.channels}: must be 1 (grey) or 3 (colour)")
        if self.resize not in RESIZE:
            raise DataError(f"resize={self.resize!r}: must be one of {', '.join(RESIZE)}")
        if min(self.height, self.width) < 1:
            raise DataError(f"image size {self.height}x{self.width}: must be positive")

    @property
    def shape(self) -> list[int]:
        return [self.height, self.width, self.channels]


def decode(raw: tf.Tensor, channels: int) -> tf.Tensor:
    """Encoded bytes -> uint8 [h, w, channels]. PNG and JPEG go through `decode_image`'s own
    channel conversion (the serving signature's); GIF and BMP, which it converts to colour
    only, are decoded to colour and then to grey by luma."""
    if channels == 3:
        return tf.ensure_shape(tf.io.decode_image(raw, channels=3, expand_animations=False),
                               [None, None, 3])
    png_or_jpeg = ((tf.strings.substr(raw, 0, len(encoded.PNG_MAGIC)) == encoded.PNG_MAGIC)
                   | (tf.strings.substr(raw, 0, len(encoded.JPEG_MAGIC)) == encoded.JPEG_MAGIC))

    def via_colour():
        rgb = tf.io.decode_image(raw, channels=3, expand_animations=False)
        grey = tf.image.rgb_to_grayscale(tf.cast(rgb, tf.float32))
        return tf.cast(tf.round(grey), tf.uint8)

    image = tf.cond(png_or_jpeg, lambda: tf.io.decode_image(
        raw, channels=channels, expand_animations=False), via_colour)
    return tf.ensure_shape(image, [None, None, channels])


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
    return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                           method="bilinear")


def fit(image: tf.Tensor, height: int, width: int, resize: str) -> tf.Tensor:
    """uint8 [h, w, C] -> uint8 [height, width, C] by the `resize` policy."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    if resize == "crop":  # the largest centred region of aspect height:width
        wide = w * height > h * width
        crop_h = tf.where(wide, h, tf.cast(tf.round(w * height / width), tf.int32))
        crop_w = tf.where(wide, tf.cast(tf.round(h * width / height), tf.int32), w)
        crop_h, crop_w = tf.clip_by_value(crop_h, 1, h), tf.clip_by_value(crop_w, 1, w)
        image = image[(h - crop_h) // 2:(h - crop_h) // 2 + crop_h,
                      (w - crop_w) // 2:(w - crop_w) // 2 + crop_w]
        out = _resize(image, height, width)
    elif resize == "pad":  # the longer side fits; black bands centred on the shorter one
        scale = tf.minimum(height / tf.cast(h, tf.float64), width / tf.cast(w, tf.float64))
        new_h = tf.clip_by_value(tf.cast(tf.round(tf.cast(h, tf.float64) * scale), tf.int32),
                                 1, height)
        new_w = tf.clip_by_value(tf.cast(tf.round(tf.cast(w, tf.float64) * scale), tf.int32),
                                 1, width)
        out = tf.image.pad_to_bounding_box(_resize(image, new_h, new_w), (height - new_h) // 2,
                                           (width - new_w) // 2, height, width)
    else:
        out = _resize(image, height, width)
    out = tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(out, [height, width, image.shape[-1]])


def image(raw: tf.Tensor, policy: ImagePolicy) -> tf.Tensor:
    """Encoded bytes (scalar string) -> uint8 [height, width, channels] by `policy`; an
    InvalidArgumentError for what cannot be decoded. Check the header first (`sniff`): the
    decoder allocates whatever size a header declares."""
    return fit(decode(raw, policy.channels), policy.height, policy.width, policy.resize)


def skip_reason(error: Exception) -> str:
    """`undecodable: <the decoder's message>`."""
    message = getattr(error, "message", str(error)).strip().split("\n")[0]
    if message.startswith("{{function_node"):
        message = message.split("}}", 1)[-1].strip()
    return f"undecodable: {message.replace(' [Op:DecodeImage]', '').strip()}"


@dataclasses.dataclass(frozen=True)
class Header:
    """What an image file's header declares."""

    height: int
    width: int
    channels: int  # as stored: 1 grey, 3 colour, 4 CMYK (JPEG)
    supported: bool = True  # JPEG: a frame the decoder reads (see sdim_tf.encoded)

    def problem(self, max_side: int) -> str:
        """Why the file is not decoded ("" when it may be): unsupported, too_large."""
        if not self.supported or self.channels == 4:
            return ("unsupported: a JPEG the decoder cannot read (CMYK, 12-bit, lossless or "
                    "arithmetic-coded)")
        if max(self.height, self.width) > max_side:
            return (f"too_large: {self.width}x{self.height} pixels, a side over "
                    f"max_source_side={max_side}")
        return ""


_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: markers without a length


def _jpeg_header(f) -> Optional[Header]:
    """The first start-of-frame segment of a JPEG file positioned after its SOI marker."""
    for _ in range(encoded.JPEG_MAX_SEGMENTS):
        marker = f.read(2)
        while len(marker) == 2 and marker[0] == 0xFF and marker[1] == 0xFF:  # fill bytes
            marker = marker[1:] + f.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if marker[1] in _NO_LENGTH:
            continue
        length = int.from_bytes(f.read(2), "big")
        if marker[1] in encoded._SOF:
            frame = f.read(6)
            if length < 8 or len(frame) < 6:
                return None
            components = frame[5]
            return Header(int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big"),
                          components, marker[1] in encoded._DECODABLE_SOF and frame[0] == 8
                          and components in (1, 3))
        if length < 2 or marker[1] in (0xDA, 0xD9):  # scan or end before any frame
            return None
        f.seek(length - 2, 1)
    return None


def sniff(path: str | os.PathLike) -> Optional[Header]:
    """The header of an image file (PNG and JPEG read directly, other formats by Pillow);
    None when it is no image recognised. Reads only the header."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # os.open: a third of open()'s cost
    except OSError:
        return None
    try:
        head = os.read(fd, 26)
        if head[:8] == encoded.PNG_MAGIC and head[12:16] == b"IHDR" and len(head) == 26:
            # IHDR: width, height, bit depth, colour type (0 grey, 4 grey + alpha)
            return Header(int.from_bytes(head[20:24], "big"),
                          int.from_bytes(head[16:20], "big"), 1 if head[25] in (0, 4) else 3)
        if head[:3] == encoded.JPEG_MAGIC:
            with os.fdopen(fd, "rb", closefd=False) as f:
                f.seek(2)
                return _jpeg_header(f)
    except OSError:
        return None
    finally:
        os.close(fd)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            width, height = opened.size
            return Header(height, width, 1 if opened.mode in _GREY_MODES else 3)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def read(path: str | os.PathLike) -> tuple[Optional[bytes], str]:
    """(the file's bytes, "") or (None, why not: unreadable, empty)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    if not raw:
        return None, "empty: 0 bytes"
    return raw, ""


@dataclasses.dataclass
class Encoded:
    """One file's outcome: its example and image, or the reason it was skipped."""

    example: Optional[bytes]
    image: Optional[np.ndarray]  # uint8 [height, width, channels], for the statistics
    sha256: str  # of the file's bytes: exact duplicates share it
    reason: str = ""


class ImageEncoder:
    """The per-file logic of ingest, for one policy."""

    def __init__(self, policy: ImagePolicy):
        self.policy = policy
        self._image = tf.function(lambda raw: image(raw, policy), autograph=False,
                                  input_signature=[tf.TensorSpec([], tf.string)])

    def image(self, raw: tf.Tensor) -> tf.Tensor:
        """The graph part: bytes -> uint8 image (in a tf.data map, or called eagerly)."""
        return image(raw, self.policy)

    @staticmethod
    def finish(raw: bytes, decoded: np.ndarray, label: int) -> Encoded:
        """The example of a decoded image, with the file's content hash."""
        return Encoded(serialize_example(decoded, label), decoded,
                       hashlib.sha256(raw).hexdigest())

    def encode(self, path: str | os.PathLike, label: int) -> Encoded:
        """read -> decode -> policy -> example bytes, or the reason the file is skipped."""
        raw, reason = read(path)
        if raw is None:
            return Encoded(None, None, "", reason)
        try:
            decoded = self._image(tf.constant(raw)).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.ResourceExhaustedError) as e:
            return Encoded(None, None, hashlib.sha256(raw).hexdigest(), skip_reason(e))
        return self.finish(raw, decoded, label)
