"""What an encoded image claims to be, read from its header in the graph, before decoding.

TensorFlow's decoders allocate the output the header declares before they read a pixel, so
a 249-byte PNG header declaring 16000 x 16000 pixels costs gigabytes. The serving
signatures read the format and the dimensions here, refuse what is too large or what the
decoder cannot read, and decode only what passed (behind a `tf.cond`).
"""

from __future__ import annotations

import tensorflow as tf

PNG, JPEG, UNKNOWN = 1, 2, 0
# A JPEG whose frame the decoder may not read (a CMYK one, decoded to grey, failed its whole
# batch with "jpeg::Uncompress failed"): not baseline, extended or progressive Huffman,
# samples not 8-bit, or components neither 1 (grey) nor 3 (YCbCr).
UNSUPPORTED_JPEG = 3
_DECODABLE_SOF = (0xC0, 0xC1, 0xC2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers (SOF0-SOF15 but DHT C4, JPG C8, DAC CC) hold the size.
_SOF = [m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)]
# The frame header comes after the application segments (EXIF at most 64 KiB each).
JPEG_SCAN_BYTES = 1 << 18
# Segments read before the frame: real files carry a handful (APPn, DQT, DHT, DRI, COM).
# Each one is a graph-loop step (~25 us); unbounded, a chain of 4-byte segments filling
# JPEG_SCAN_BYTES cost 1.7 s of CPU per element (found by bench/fuzz_signatures.py).
JPEG_MAX_SEGMENTS = 64


def _bytes(encoded: tf.Tensor, length: int) -> tf.Tensor:
    """The first `length` bytes as int32 [length], zero-padded when the string is shorter."""
    head = tf.io.decode_raw(tf.strings.substr(encoded, 0, length), tf.uint8)
    head = tf.cast(head, tf.int32)
    return tf.pad(head, [[0, length - tf.shape(head)[0]]])


def _png_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) from the IHDR chunk (bytes 16-24, big-endian); 0 when it is absent."""
    head = _bytes(encoded, 24)  # substr past the end would raise: compare padded bytes
    ok = tf.reduce_all(tf.equal(head[12:16], tf.constant(list(b"IHDR"), tf.int32)))

    def be32(b):  # uint32 big-endian; sides over 2^31 are clipped (both are refused anyway)
        value = ((tf.cast(b[0], tf.int64) * 256 + tf.cast(b[1], tf.int64)) * 256
                 + tf.cast(b[2], tf.int64)) * 256 + tf.cast(b[3], tf.int64)
        return tf.cast(tf.minimum(value, 2**31 - 1), tf.int32)

    width, height = be32(head[16:20]), be32(head[20:24])
    return tf.where(ok, height, 0), tf.where(ok, width, 0)


def _jpeg_frame(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(height, width, decodable) from the first start-of-frame segment; height and width 0
    (and decodable True) when none is found within JPEG_SCAN_BYTES and JPEG_MAX_SEGMENTS or
    a segment is malformed."""
    head = _bytes(encoded, JPEG_SCAN_BYTES)
    sof = tf.constant(_SOF, tf.int32)

    def cond(i, height, width, decodable, done, segments):
        return tf.logical_not(done) & (i + 9 < JPEG_SCAN_BYTES) & (segments < JPEG_MAX_SEGMENTS)

    def body(i, height, width, decodable, done, segments):
        marker = head[i + 1]
        is_marker = head[i] == 0xFF
        is_frame = is_marker & tf.reduce_any(tf.equal(sof, marker))
        length = head[i + 2] * 256 + head[i + 3]
        height = tf.where(is_frame, head[i + 5] * 256 + head[i + 6], height)
        width = tf.where(is_frame, head[i + 7] * 256 + head[i + 8], width)
        # marker, sample precision (byte 4) and component count (byte 9) of the frame
        frame_ok = (tf.reduce_any(tf.equal(marker, _DECODABLE_SOF)) & (head[i + 4] == 8)
                    & ((head[i + 9] == 1) | (head[i + 9] == 3)))
        decodable = tf.where(is_frame, frame_ok, decodable)
        # A frame, a non-marker byte or a zero-length segment ends the scan.
        done = is_frame | tf.logical_not(is_marker) | (length < 2)
        return i + 2 + length, height, width, decodable, done, segments + 1

    _, height, width, decodable, _, _ = tf.while_loop(
        cond, body, (tf.constant(2), tf.constant(0), tf.constant(0), tf.constant(True),
                     tf.constant(False), tf.constant(0)))
    return height, width, decodable


def inspect(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """A scalar string -> (format PNG/JPEG/UNSUPPORTED_JPEG/UNKNOWN, height, width) from its
    header alone; height and width are 0 when the header does not say."""
    is_png = tf.strings.substr(encoded, 0, len(PNG_MAGIC)) == PNG_MAGIC
    is_jpeg = tf.strings.substr(encoded, 0, len(JPEG_MAGIC)) == JPEG_MAGIC
    zero = (tf.constant(0), tf.constant(0), tf.constant(True))
    height, width, decodable = tf.cond(
        is_png, lambda: (*_png_size(encoded), tf.constant(True)),
        lambda: tf.cond(is_jpeg, lambda: _jpeg_frame(encoded), lambda: zero))
    jpeg = tf.where(decodable, JPEG, UNSUPPORTED_JPEG)
    kind = tf.where(is_png, PNG, tf.where(is_jpeg, jpeg, UNKNOWN))
    return kind, height, width
