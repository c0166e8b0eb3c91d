"""Subprocess of `bench.run --only=reliability`: a TensorFlow-only process loads a SavedModel
and answers requests whose PNG headers declare huge images; prints JSON figures.

    python bench/header_bombs.py MODEL_DIR
"""

import json
import resource
import struct
import sys
import time
import zlib

import numpy as np
import tensorflow as tf


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height grey pixels, no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(model_dir: str) -> dict:
    loaded = tf.saved_model.load(model_dir)
    encoded = loaded.signatures["classify_encoded"]
    valid = tf.io.encode_png(np.zeros((28, 28, 1), np.uint8)).numpy()
    encoded(images=tf.constant([valid]))  # warm
    baseline = peak_mib()
    figures = {}
    for name, batch in (("eight_16000x16000_headers", [png_header(16000, 16000)] * 8),
                        ("one_non_image_two_pngs", [b"not an image", valid, valid])):
        start = time.perf_counter()
        out = encoded(images=tf.constant(batch))
        figures[name] = {"seconds": round(time.perf_counter() - start, 4),
                         "peak_rss_growth_mib": round(peak_mib() - baseline, 1),
                         "reasons": [r.decode() for r in out["reason"].numpy()],
                         # rows decided on their content: accepted, unfamiliar, ambiguous
                         "answered": int(np.isin(out["reason"].numpy(),
                                                 [b"", b"unfamiliar", b"ambiguous"]).sum())}
    figures["post_load_peak_rss_mib"] = round(baseline, 1)
    assert "sdim_tf" not in sys.modules
    return figures


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
