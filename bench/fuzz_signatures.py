"""Signature fuzzing: generated requests against an exported SavedModel, answered
by a process that imports TensorFlow only, as a downstream server would load it.

    python -m bench.fuzz_signatures MODEL_DIR SPEC.json IMAGES.npz --cases=10000 --seed=0

(run from the repository root; `run_worker` does it for tests/test_fuzz_signatures.py and
`bench.run --only=reliability`). It prints one JSON line of figures: cases and outcomes per
signature, rows by reason, refusals by message class, worst latency, resident memory growth,
the failures with a reproducer, and the gRPC-shaped hazards of `tensor_proto_hazards`.

The property (`check`): every request is either answered, with the README's outputs (shapes,
dtypes, `rejected == ~(score >= threshold) | ~(gap >= min_gap) | invalid`, a reason on
exactly the rejected rows, the reason an independent reading of the input predicts), or
refused with an InvalidArgumentError whose message names the problem (a TypeError/ValueError
of the Python call, before the graph, also counts); never another exception, never an abort;
no request of at most 64 images takes over 2 s (of wall and of CPU time: `Outcome.cost`); the peak
resident memory stays within 512 MiB of what the process held after loading. (At a
max_batch of 1024, the default before, it did not: one such request holds ~0.4 GiB of
activations, and every new batch size leaves cached kernels behind; see
bench/results/<machine kind>/reliability.json.)

Why hypothesis and not atheris: atheris pip-installs here (a 3.0.0 wheel) and runs beside
TensorFlow, but it is coverage-guided and TensorFlow's kernels carry no libFuzzer
instrumentation, so it mutates bytes blindly ("no interesting inputs ... Is the code
instrumented?"); it owns the process (exits at the end and at the first crash) and knows
nothing of shapes or dtypes. hypothesis builds structured requests (ranks, dtypes, special
floats, real images re-encoded, mutated or forged) reproducibly from a seed.

Why hypothesis runs in the worker, not in the parent piping cases: requests reach 64 MiB and
more (the max_request_bytes case) and hold arrays of bytes; generating them beside the
target needs no serialisation and no second copy, and a journal written before each call
names the case that killed the process.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pathlib
import re
import resource
import struct
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from tensorflow.core.framework import tensor_pb2

from bench.header_bombs import peak_mib, png_header

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIGNATURES = ("serving_default", "classify_raw", "classify_encoded")
VALID = frozenset({"", "unfamiliar", "ambiguous"})  # a row decided on its content
MAX_SECONDS, LATENCY_BATCH = 2.0, 64  # no request of at most 64 images may take longer
RSS_BUDGET_MIB = 512
# README, "Serving the exported model": output -> (rank, dtype); rank 2 is [N, C].
OUTPUTS = {"class_scores": (2, np.float32), "probabilities": (2, np.float32),
           "class_ids": (1, np.int64), "class_name": (1, np.object_),
           "score": (1, np.float32), "threshold": (1, np.float32),
           "gap": (1, np.float32), "min_gap": (1, np.float32),
           "rejected": (1, np.bool_), "reason": (1, np.object_)}
# A refusal's message class: the first pattern its text (without the "[Op:...]" suffix,
# which names the signature whatever the error) matches. None of them: the message names
# no problem, a failure.
REFUSALS = (("max_batch", re.compile(r"max_batch=\d+")),
            ("max_request_bytes", re.compile(r"max_request_bytes=\d+")),
            ("max_request_pixels", re.compile(r"max_request_pixels=\d+")),
            ("shape", re.compile(r"images must be \[")),
            ("dtype", re.compile(r"input #0\(zero-based\) was expected to be a \w+ tensor")),
            ("decode", re.compile(r"\b(PNG|JPEG)\b|jpeg::")))
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_JPEG_SOF = frozenset(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))
# README: the JPEG frames classify_encoded decodes (baseline, extended or progressive
# Huffman; 8-bit samples; grey or YCbCr); the others are unsupported_jpeg.
_JPEG_DECODABLE, _JPEG_PRECISION, _JPEG_COMPONENTS = frozenset({0xC0, 0xC1, 0xC2}), 8, (1, 3)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the worker must know of the exported model, from the parent (the worker may not
    import sdim_tf): the documented reasons, the limits, the thresholds, the input sizes
    and the header scan's bounds."""

    reasons: frozenset[str]
    max_batch: int
    max_request_bytes: int
    max_request_pixels: int
    max_image_bytes: int
    max_image_side: int
    thresholds: tuple[float, ...]
    class_names: tuple[str, ...]
    channels: int
    source_size: tuple[int, int]
    image_size: int
    jpeg_scan_bytes: int
    jpeg_max_segments: int

    @classmethod
    def of(cls, module) -> Spec:
        """The spec of a serving.RejectingClassifier (in the parent)."""
        from sdim_tf import data, encoded, serving

        return cls(reasons=frozenset(serving.REASONS), thresholds=tuple(
            float(t) for t in module.thresholds.numpy()), class_names=tuple(
                module.class_names or map(str, range(module.num_classes))),
            channels=module.channels,
            source_size=tuple(module.source_size), image_size=data.IMAGE_SIZE,
            jpeg_scan_bytes=encoded.JPEG_SCAN_BYTES,
            jpeg_max_segments=encoded.JPEG_MAX_SEGMENTS,
            **dataclasses.asdict(module.limits))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "reasons": sorted(self.reasons)}

    @classmethod
    def from_json(cls, obj: dict) -> Spec:
        return cls(**{**obj, "reasons": frozenset(obj["reasons"]),
                      "thresholds": tuple(obj["thresholds"]),
                      "class_names": tuple(obj["class_names"]),
                      "source_size": tuple(obj["source_size"])})


@dataclasses.dataclass
class Request:
    """One generated request and what may come back.

    `rows`: per row, the reasons an answer may give it (None: the request must be refused);
    `refusals`: the message classes that may refuse it (empty: it must be answered).
    """

    signature: str
    images: np.ndarray  # numeric, or object (bytes) for string tensors
    what: str  # how it was built: the reproducer
    rows: list[frozenset[str]] | None
    refusals: frozenset[str] = frozenset()
    cast: str | None = None  # a tf dtype numpy lacks (bfloat16), cast to after conversion


@dataclasses.dataclass
class Outcome:
    outputs: dict[str, np.ndarray] | None
    refusal: str | None  # message class, "python" (TypeError/ValueError), "unnamed", "other"
    message: str
    seconds: float  # wall clock
    cpu_seconds: float  # of the whole process (TensorFlow's threads included)

    @property
    def cost(self) -> float:
        """What the latency bound applies to: wall and CPU time both over it is a slow
        request; wall alone is a contended machine (this one shares 2 cores with a training
        run, the worker runs at nice 19), CPU alone is parallel work."""
        return min(self.seconds, self.cpu_seconds)


# ---------------------------------------------------------------------------------------------
# The oracle: what each input should get, read independently of the graph.

def float_row_reasons(images: np.ndarray) -> list[frozenset[str]]:
    """The reasons serving_default may give each row of float32 [N, ...] images."""
    flat = images.reshape(len(images), int(np.prod(images.shape[1:])))
    finite = np.isfinite(flat).all(1)
    outside = ((flat < 0) | (flat > 1)).any(1)
    # TensorFlow's CPU kernels may flush subnormals to zero: -1e-45 may compare as 0.
    tiny = np.finfo(np.float32).tiny
    clearly_outside = ((flat < -tiny) | (flat > 1)).any(1)
    return [frozenset({"non_finite"}) if not f else
            frozenset({"out_of_range"}) if c else
            frozenset({"out_of_range"}) | VALID if o else VALID
            for f, o, c in zip(finite, outside, clearly_outside, strict=True)]


def _png_size(data: bytes) -> tuple[int, int]:
    head = data[:24].ljust(24, b"\0")
    if head[12:16] != b"IHDR":
        return 0, 0
    width, height = struct.unpack(">II", head[16:24])
    return min(height, 2**31 - 1), min(width, 2**31 - 1)


def _jpeg_frame(data: bytes, spec: Spec) -> tuple[int, int, bool]:
    """(height, width, decodable) of the first frame; (0, 0, True) when none is found."""
    head = data[:spec.jpeg_scan_bytes].ljust(spec.jpeg_scan_bytes, b"\0")
    i, segments = 2, 0
    while i + 9 < spec.jpeg_scan_bytes and segments < spec.jpeg_max_segments:
        is_marker, length = head[i] == 0xFF, head[i + 2] * 256 + head[i + 3]
        if is_marker and head[i + 1] in _JPEG_SOF:
            decodable = (head[i + 1] in _JPEG_DECODABLE and head[i + 4] == _JPEG_PRECISION
                         and head[i + 9] in _JPEG_COMPONENTS)
            return head[i + 5] * 256 + head[i + 6], head[i + 7] * 256 + head[i + 8], decodable
        if not is_marker or length < 2:
            break
        i, segments = i + 2 + length, segments + 1
    return 0, 0, True


def _declared(data: bytes, spec: Spec) -> tuple[int, int, bool] | None:
    """(height, width, decodable) as the header declares; None: neither PNG nor JPEG."""
    if data.startswith(PNG_MAGIC):
        return (*_png_size(data), True)
    if data.startswith(JPEG_MAGIC):
        return _jpeg_frame(data, spec)
    return None


def header_reason(data: bytes, spec: Spec) -> str | None:
    """classify_encoded's verdict on one element before decoding (refusal reason, or None:
    it goes to the decoder), re-implemented from README's table as the oracle."""
    if len(data) > spec.max_image_bytes:
        return "too_large"
    declared = _declared(data, spec)
    if declared is None:
        return "not_png_or_jpeg"
    height, width, decodable = declared
    if height <= 0 or width <= 0:
        return "bad_header"
    if not decodable:
        return "unsupported_jpeg"
    return "too_large" if max(height, width) > spec.max_image_side else None


def request_pixels(elements: list[bytes], spec: Spec) -> int:
    """What max_request_pixels bounds: the pixels the headers declare, summed over the
    elements that pass their header."""
    return sum(height * width for data in elements if header_reason(data, spec) is None
               for height, width, _ in [_declared(data, spec)])


# ---------------------------------------------------------------------------------------------
# The property.

def classify_refusal(error: BaseException) -> tuple[str, str]:
    """(message class, message) of an exception a call raised."""
    message = str(error)
    if isinstance(error, tf.errors.InvalidArgumentError):
        text = re.sub(r"\s*\[Op:__inference_\w+\]\s*$", "", message)
        for name, pattern in REFUSALS:
            if pattern.search(text):
                return name, message
        return "unnamed", message
    if isinstance(error, (TypeError, ValueError)):
        return "python", message
    return f"other:{type(error).__name__}", message


def check(request: Request, outcome: Outcome, spec: Spec) -> list[str]:
    """The property's violations by one request's outcome (empty: it holds)."""
    problems = []
    rows = request.rows
    if rows is not None and len(rows) <= LATENCY_BATCH and outcome.cost > MAX_SECONDS:
        problems.append(f"took {outcome.seconds:.2f} s ({outcome.cpu_seconds:.2f} s of CPU) "
                        f"for {len(rows)} images")
    if outcome.outputs is None:
        if outcome.refusal not in request.refusals:
            problems.append(f"refused ({outcome.refusal}) but allowed "
                            f"{sorted(request.refusals) or 'no refusal'}: "
                            f"{outcome.message[-400:]}")
        return problems
    if rows is None:
        return problems + [f"answered but must be refused ({sorted(request.refusals)})"]
    out = outcome.outputs
    if set(out) != set(OUTPUTS):
        return problems + [f"outputs {sorted(out)} are not the documented {sorted(OUTPUTS)}"]
    n, c = len(rows), len(spec.thresholds)
    malformed = [f"{key}: {out[key].dtype}{list(out[key].shape)}, documented "
                 f"{np.dtype(dtype)}{list(shape)}"
                 for key, (rank, dtype) in OUTPUTS.items()
                 for shape in [(n, c) if rank == 2 else (n,)]
                 if out[key].shape != shape or out[key].dtype != dtype]
    if malformed:
        return problems + malformed
    reason = np.array([r.decode() if isinstance(r, bytes) else str(r) for r in out["reason"]],
                      dtype=object)
    unknown = set(reason) - spec.reasons
    if unknown:
        problems.append(f"reasons {sorted(unknown)} not among the documented ones")
    invalid = ~np.isin(reason, list(VALID))
    unfamiliar = ~(out["score"] >= out["threshold"]) & ~invalid
    ambiguous = ~(out["gap"] >= out["min_gap"]) & ~unfamiliar & ~invalid
    rule = unfamiliar | ambiguous | invalid
    if not np.array_equal(out["rejected"], rule):
        problems.append(f"rejected != ~(score >= threshold) | ~(gap >= min_gap) | invalid at "
                        f"rows {np.flatnonzero(out['rejected'] != rule)[:8].tolist()}")
    if not (np.array_equal(reason == "unfamiliar", unfamiliar)
            and np.array_equal(reason == "ambiguous", ambiguous)):
        problems.append("unfamiliar/ambiguous on rows other than the threshold's/gap's")
    if not np.array_equal(reason != "", out["rejected"]):
        problems.append(f"a reason on rows not rejected (or none on rejected ones): "
                        f"{np.flatnonzero((reason != '') != out['rejected'])[:8].tolist()}")
    wrong = [i for i, r in enumerate(reason) if r not in rows[i]]
    if wrong:
        i = wrong[0]
        problems.append(f"{len(wrong)} rows with an unexpected reason, e.g. row {i}: "
                        f"{reason[i]!r} not in {sorted(rows[i])}")
    scores = out["class_scores"]
    names = np.array([str(n) for n in spec.class_names], object)
    named = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in out["class_name"]],
                     object)
    if ((out["class_ids"] < 0) | (out["class_ids"] >= c)).any() or not np.array_equal(
            named, names[np.clip(out["class_ids"], 0, c - 1)]):
        problems.append("class_name is not the name of class_ids")
    if invalid.any():  # docs/serving.md: refused rows come back with scores -inf
        refused = (np.isneginf(scores[invalid]).all() and np.isneginf(out["score"][invalid]).all()
                   and np.isneginf(out["gap"][invalid]).all()
                   and not out["probabilities"][invalid].any())
        if not refused:
            problems.append("an invalid row's scores are not -inf (or probabilities not 0)")
    valid = ~invalid
    if valid.any():
        thresholds = np.asarray(spec.thresholds, np.float32)
        ids = out["class_ids"][valid]
        if not np.isfinite(scores[valid]).all():
            problems.append("a valid row's class scores are not finite")
        elif ((ids < 0) | (ids >= c)).any():
            problems.append(f"class_ids {sorted(set(ids.tolist()))} outside [0, {c})")
        elif not (np.array_equal(ids, scores[valid].argmax(1))
                  and np.array_equal(out["score"][valid], scores[valid].max(1))
                  and np.array_equal(out["threshold"][valid], thresholds[ids])
                  and (c < 2 or np.array_equal(out["gap"][valid], np.diff(
                      np.sort(scores[valid], 1)[:, -2:], axis=1)[:, 0]))):
            problems.append("class_ids/score/threshold/gap disagree with class_scores and "
                            "the deployed thresholds")
        probabilities = out["probabilities"][valid]
        if not np.allclose(probabilities.sum(1), 1.0, atol=1e-4):
            problems.append("a valid row's probabilities do not sum to 1")
        elif not np.array_equal(probabilities[np.arange(len(ids)), np.clip(ids, 0, c - 1)],
                                probabilities.max(1)):
            problems.append("probabilities peak at another class than class_ids")
    return problems


def call(function, request: Request) -> Outcome:
    """Sends `request` to a loaded signature."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        images = request.images
        tensor = tf.constant(images, tf.string) if images.dtype == object else \
            tf.constant(images)
        if request.cast:
            tensor = tf.cast(tensor, request.cast)
        start, cpu = time.perf_counter(), time.process_time()
        outputs = {k: v.numpy() for k, v in function(images=tensor).items()}
        return Outcome(outputs, None, "", time.perf_counter() - start,
                       time.process_time() - cpu)
    except Exception as e:  # classified, and checked against what the request allows
        refusal, message = classify_refusal(e)
        return Outcome(None, refusal, message, time.perf_counter() - start,
                       time.process_time() - cpu)


# ---------------------------------------------------------------------------------------------
# Strategies: requests per signature.

SPECIAL_FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0,
                  float(np.nextafter(np.float32(1), np.float32(2))), -1e-45, 1e-45,
                  float(np.finfo(np.float32).tiny), -float(np.finfo(np.float32).tiny),
                  3.4e38, -3.4e38, 1e-30, 2.0, -1.0, 255.0]
ANY_FLOAT32 = hnp.from_dtype(np.dtype(np.float32), allow_subnormal=True)
UNIT_FLOAT32 = st.floats(0.0, 1.0, width=32)


@dataclasses.dataclass
class Pool:
    """Real images from the parent: uint8 at the source size, and float32 [32, 32, C] as
    serving_default takes them."""

    raw: np.ndarray
    floats: np.ndarray


def batch_sizes(largest: int) -> st.SearchStrategy[int]:
    """Mostly small batches, some up to 64, a few up to `largest` (which cost seconds)."""
    buckets = {"zero": st.just(0), "small": st.integers(1, 8), "medium": st.integers(9, 64),
               "large": st.integers(65, max(65, largest))}
    return st.sampled_from(["zero"] + ["small"] * 12 + ["medium"] * 6 + ["large"]).flatmap(
        buckets.__getitem__)


def _near_misses(n: int, height: int, width: int, channels: int) -> list[tuple[int, ...]]:
    """Shapes one mistake away from [n, height, width, channels]."""
    return [(n, height, width, channels + 1), (n, height, width, 3 if channels != 3 else 1),
            (n, height + 1, width, channels), (n, height, width - 1, channels),
            (n, width + 4, height + 4, channels), (height, width, channels),
            (1, n, height, width, channels), (n, height, width, channels, 1),
            (n, height * width * channels), (n, 0, width, channels), (n, height, width, 0),
            (n, height, width), ()]


def _shape_request(signature: str, shape: tuple[int, ...], size: tuple[int, int],
                   spec: Spec) -> tuple[list[frozenset[str]] | None, frozenset[str]]:
    """(rows, refusals) of a numeric request by its shape alone."""
    if len(shape) == 4 and shape[1:] == (*size, spec.channels):
        if shape[0] > spec.max_batch:
            return None, frozenset({"max_batch"})
        return [VALID] * shape[0], frozenset()
    # the shape and batch checks run side by side: either may answer first
    return None, frozenset({"shape"} | ({"max_batch"} if shape and shape[0] > spec.max_batch
                                        else set()))


def _numeric_requests(signature: str, dtype: np.dtype, size: tuple[int, int],
                      real: np.ndarray, spec: Spec, largest: int
                      ) -> st.SearchStrategy[Request]:
    """serving_default (float32 [N, 32, 32, C]) or classify_raw (uint8 at the source size)."""
    is_float = dtype == np.float32
    full = (*size, spec.channels)

    @st.composite
    def batch(draw) -> Request:
        n = draw(batch_sizes(largest))
        base = draw(st.sampled_from(["real", "real", "noise", "hypothesis"]))
        if base == "real":
            start = draw(st.integers(0, len(real) - 1))
            images = real[(start + np.arange(n)) % len(real)].copy()
            what = f"real images from {start}"
        elif base == "noise":
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            if is_float:
                scale = draw(st.sampled_from([1.0, 1.0, 1.001, 2.0, 1e6]))
                offset = draw(st.sampled_from([0.0, 0.0, -1e-3, -0.5, 1e3]))
                images = (rng.random((n, *full), np.float32) * scale + offset).astype(dtype)
                what = f"uniform noise * {scale} + {offset}"
            else:
                images = rng.integers(0, 256, (n, *full), np.uint8)
                what = "uniform noise"
        else:
            elements = (st.one_of(UNIT_FLOAT32, ANY_FLOAT32) if is_float
                        else hnp.from_dtype(np.dtype(np.uint8)))
            images = draw(hnp.arrays(dtype, (n, *full), elements=elements, fill=elements))
            what = "hypothesis array"
        specials = []
        if is_float and n:
            specials = draw(st.lists(st.tuples(
                st.integers(0, n - 1), st.integers(0, int(np.prod(full)) - 1),
                st.one_of(st.sampled_from(SPECIAL_FLOATS), ANY_FLOAT32)), max_size=6))
            for row, index, value in specials:
                images[row].reshape(-1)[index] = value
        rows = float_row_reasons(images) if is_float else [VALID] * n
        return Request(signature, images, f"{signature} {dtype}{list(images.shape)} {what}"
                       f"{f' specials {specials}' if specials else ''}", rows)

    @st.composite
    def shape(draw) -> Request:
        n = draw(st.integers(0, 8))
        dims = draw(st.one_of(st.sampled_from(_near_misses(n, *full)),
                              hnp.array_shapes(min_dims=0, max_dims=6, min_side=0,
                                               max_side=6)))
        images = np.full(dims, 0.5 if is_float else 128, dtype)
        rows, refusals = _shape_request(signature, dims, size, spec)
        if rows is not None and is_float:
            rows = float_row_reasons(images)
        return Request(signature, images, f"{signature} {dtype}{list(dims)}", rows, refusals)

    @st.composite
    def other_dtype(draw) -> Request:
        n = draw(st.integers(0, 8))
        if draw(st.booleans()) and is_float:  # a dtype numpy lacks
            return Request(signature, np.full((n, *full), 0.5, np.float32),
                           f"{signature} bfloat16{[n, *full]}", None,
                           frozenset({"dtype", "python"}), cast="bfloat16")
        # (a byte-swapped float32 is still float32: TensorFlow converts it)
        other = draw(hnp.scalar_dtypes().filter(lambda d: d.newbyteorder("=") != dtype))
        images = draw(hnp.arrays(other, (n, *full)))
        return Request(signature, images, f"{signature} {other}{[n, *full]}", None,
                       frozenset({"dtype", "python"}))

    @st.composite
    def over_max_batch(draw) -> Request:
        n = spec.max_batch + draw(st.integers(1, 64))
        return Request(signature, np.zeros((n, *full), dtype), f"{signature} {n} images", None,
                       frozenset({"max_batch"}))

    kinds = [batch()] * 8 + [shape(), shape(), other_dtype(), over_max_batch()]
    return st.sampled_from(range(len(kinds))).flatmap(kinds.__getitem__)


def serving_default_requests(pool: Pool, spec: Spec, largest: int
                             ) -> st.SearchStrategy[Request]:
    size = (spec.image_size, spec.image_size)
    return _numeric_requests("serving_default", np.dtype(np.float32), size, pool.floats, spec,
                             largest)


def classify_raw_requests(pool: Pool, spec: Spec, largest: int) -> st.SearchStrategy[Request]:
    return _numeric_requests("classify_raw", np.dtype(np.uint8), spec.source_size, pool.raw,
                             spec, largest)


@dataclasses.dataclass(frozen=True)
class Element:
    """One encoded element; `decodes`: a valid image that must decode if its header passes."""

    data: bytes
    what: str
    decodes: bool


def _pil(image: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    out = io.BytesIO()
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if mode:
        picture = picture.convert(mode)
    picture.save(out, fmt, **kwargs)
    return out.getvalue()


def jpeg_header(height: int, width: int, segments: list[tuple[int, bytes]],
                frame: int | None = 0xC0, precision: int = 8, components: int = 1) -> bytes:
    """A JPEG start, `segments` (marker, payload), and a frame header declaring
    height x width, `precision`-bit samples and `components` (no frame: `frame` None); no
    scan data."""
    parts = [b"\xff\xd8"]
    for marker, payload in segments:
        parts.append(bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload)
    if frame is not None:
        sof = struct.pack(">BHHB", precision, height, width, components) + b"".join(
            bytes([c + 1, 0x11, 0]) for c in range(components))
        parts.append(bytes([0xFF, frame]) + struct.pack(">H", len(sof) + 2) + sof)
    return b"".join(parts)


def encoded_elements(pool: Pool, spec: Spec) -> st.SearchStrategy[Element]:
    """Valid PNG/JPEG of real images and of other sizes, channels and modes; other formats;
    truncated and bit-flipped images; random bytes; forged headers; oversize elements."""
    sides = st.integers(1, 300)

    @st.composite
    def real(draw) -> Element:
        i = draw(st.integers(0, len(pool.raw) - 1))
        if draw(st.booleans()):
            return Element(tf.io.encode_png(pool.raw[i]).numpy(), f"png(real {i})", True)
        quality = draw(st.integers(1, 100))
        return Element(tf.io.encode_jpeg(pool.raw[i], quality=quality).numpy(),
                       f"jpeg(real {i}, q{quality})", True)

    @st.composite
    def resized(draw) -> Element:
        """A real image (or noise) at another size and channel count."""
        height, width = draw(sides), draw(sides)
        fmt = draw(st.sampled_from(["png", "png16", "jpeg"]))
        channels = draw(st.sampled_from([1, 3] if fmt == "jpeg" else [1, 2, 3, 4]))
        i = draw(st.integers(0, len(pool.raw) - 1))
        source = pool.raw[i][..., 0]
        rows = np.arange(height) * source.shape[0] // height
        cols = np.arange(width) * source.shape[1] // width
        image = np.repeat(source[rows][:, cols][..., None], channels, -1)
        if draw(st.booleans()):
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            image = rng.integers(0, 256, image.shape, np.uint8)
        what = f"{fmt}({height}x{width}x{channels} from real {i})"
        if fmt == "png16":
            return Element(tf.io.encode_png(image.astype(np.uint16) * 257).numpy(), what, True)
        if fmt == "png":
            return Element(tf.io.encode_png(image).numpy(), what, True)
        return Element(tf.io.encode_jpeg(image, progressive=draw(st.booleans())).numpy(),
                       what, True)

    @st.composite
    def pil(draw) -> Element:
        """Modes the TensorFlow encoders do not write, and formats we refuse."""
        i = draw(st.integers(0, len(pool.raw) - 1))
        image = pool.raw[i]
        kind = draw(st.sampled_from(["P", "1", "LA", "I;16", "RGBA", "APNG", "CMYK", "GIF",
                                     "BMP", "WEBP", "TIFF"]))
        if kind == "APNG":
            data = _pil(image, "PNG", save_all=True,
                        append_images=[Image.fromarray(255 - image[..., 0])])
        elif kind == "CMYK":  # 4 components: unsupported_jpeg, from the header
            return Element(_pil(image, "JPEG", "CMYK"), f"CMYK jpeg(real {i})", False)
        elif kind in ("GIF", "BMP", "WEBP", "TIFF"):
            data = _pil(image, kind)
        else:
            data = _pil(image, "PNG", kind)
        return Element(data, f"{kind}(real {i})", True)

    @st.composite
    def mutated(draw) -> Element:
        base = draw(st.one_of(real(), resized()))
        data = bytearray(base.data)
        if draw(st.booleans()):
            cut = draw(st.integers(0, len(data) - 1))
            return Element(bytes(data[:cut]), f"{base.what} truncated to {cut}", False)
        flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                              min_size=1, max_size=8))
        for position, bit in flips:
            data[position] ^= 1 << bit
        return Element(bytes(data), f"{base.what} bits flipped {flips}", False)

    @st.composite
    def forged(draw) -> Element:
        kind = draw(st.sampled_from(["random", "magic", "png_header", "jpeg_header",
                                     "jpeg_flood", "oversize", "empty"]))
        if kind == "random":
            return Element(draw(st.binary(max_size=600)), "random bytes", False)
        if kind == "magic":
            magic = draw(st.sampled_from([PNG_MAGIC, JPEG_MAGIC, PNG_MAGIC + b"\0\0\0\rIHDR",
                                          b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBP"]))
            tail = draw(st.binary(max_size=200))
            return Element(magic + tail, f"{magic!r} + {len(tail)} random bytes", False)
        if kind == "png_header":
            side = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(
                [0, 1, 28, spec.max_image_side, spec.max_image_side + 1, 16000, 2**31 - 1,
                 2**31, 2**32 - 1]))
            width, height = draw(side), draw(side)
            return Element(png_header(width, height), f"png_header({width}, {height})", False)
        if kind == "jpeg_header":
            side = st.one_of(st.integers(0, 65535), st.sampled_from(
                [0, 1, 28, spec.max_image_side, spec.max_image_side + 1, 65535]))
            height, width = draw(side), draw(side)
            segments = draw(st.lists(st.tuples(st.integers(0xE0, 0xEF), st.binary(max_size=64)),
                                     max_size=4))
            frame = draw(st.sampled_from([0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCF, 0xC4, None]))
            precision = draw(st.sampled_from([8, 8, 12, 16]))
            components = draw(st.sampled_from([1, 1, 3, 4, 2]))
            return Element(jpeg_header(height, width, segments, frame, precision, components),
                           f"jpeg_header({height}, {width}, {len(segments)} segments, "
                           f"frame {frame}, {precision}-bit, {components} components)", False)
        if kind == "jpeg_flood":  # tiny segments up to the scan window: the scan's cost
            count = draw(st.one_of(st.integers(0, 100), st.integers(0, 70000)))
            frame = draw(st.booleans())
            data = jpeg_header(28, 28, [(0xE0, b"")] * count, 0xC0 if frame else None)
            return Element(data, f"jpeg with {count} empty segments, frame {frame}", False)
        if kind == "oversize":
            extra = draw(st.integers(-1, 8))
            data = png_header(28, 28).ljust(spec.max_image_bytes + extra, b"\0")
            return Element(data, f"png_header(28, 28) padded to max_image_bytes{extra:+d}",
                           False)
        return Element(b"", "empty string", False)

    return st.one_of(real(), real(), real(), resized(), resized(), pil(), mutated(), mutated(),
                     forged(), forged())


def strings(items: list[bytes], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """An object array of `items`, element by element: np.full and np.array go through
    numpy's fixed-width bytes, which drop trailing NUL bytes."""
    array = np.empty(len(items), object)
    for i, item in enumerate(items):
        array[i] = item
    return array.reshape(shape if shape is not None else (len(items),))


def classify_encoded_requests(pool: Pool, spec: Spec, largest: int
                              ) -> st.SearchStrategy[Request]:
    signature = "classify_encoded"
    elements = encoded_elements(pool, spec)
    small = tf.io.encode_png(pool.raw[0]).numpy()

    @st.composite
    def batch(draw) -> Request:
        n = draw(batch_sizes(largest))
        # at most 16 distinct elements, repeated up to n: large batches stay cheap to draw
        drawn = draw(st.lists(elements, min_size=min(n, 1), max_size=min(n, 16)))
        chosen, total = [], 0
        for i in range(n):  # repeated only up to just over max_request_bytes
            if total > spec.max_request_bytes:
                break
            chosen.append(drawn[i % len(drawn)])
            total += len(chosen[-1].data)
        images = strings([e.data for e in chosen])
        what = f"{signature} {len(chosen)} elements: " + "; ".join(
            f"[{i}] {e.what}" for i, e in enumerate(drawn))
        if total > spec.max_request_bytes:
            return Request(signature, images, what, None, frozenset({"max_request_bytes"}))
        if request_pixels([e.data for e in chosen], spec) > spec.max_request_pixels:
            return Request(signature, images, what, None, frozenset({"max_request_pixels"}))
        verdicts = [header_reason(e.data, spec) for e in chosen]
        rows = [frozenset({v}) if v else VALID for v in verdicts]
        # an element that passes its header but is not a valid image may fail to decode,
        # which refuses the whole request (README)
        may_fail = any(v is None and not e.decodes for v, e in zip(verdicts, chosen, strict=True))
        return Request(signature, images, what, rows,
                       frozenset({"decode"}) if may_fail else frozenset())

    @st.composite
    def rank(draw) -> Request:
        dims = draw(st.one_of(st.just(()), hnp.array_shapes(min_dims=2, max_dims=6,
                                                              min_side=0, max_side=3)))
        images = strings([small] * int(np.prod(dims)), dims)
        return Request(signature, images, f"{signature} string{list(dims)}", None,
                       frozenset({"shape"}))

    @st.composite
    def other_dtype(draw) -> Request:
        other = draw(hnp.scalar_dtypes().filter(lambda d: d.kind not in "SUO"))
        images = draw(hnp.arrays(other, draw(st.integers(0, 8))))
        return Request(signature, images, f"{signature} {other}{list(images.shape)}", None,
                       frozenset({"dtype", "python"}))

    @st.composite
    def over_max_batch(draw) -> Request:
        n = spec.max_batch + draw(st.integers(1, 64))
        return Request(signature, strings([b"x"] * n), f"{signature} {n} elements",
                       None, frozenset({"max_batch"}))

    @st.composite
    def over_max_request_bytes(draw) -> Request:
        n = spec.max_request_bytes // spec.max_image_bytes + draw(st.integers(1, 2))
        images = strings([b"\0" * spec.max_image_bytes] * n)
        return Request(signature, images,
                       f"{signature} {n} elements of max_image_bytes", None,
                       frozenset({"max_request_bytes"} | ({"max_batch"}
                                                          if n > spec.max_batch else set())))

    @st.composite
    def over_max_request_pixels(draw) -> Request:
        """Headers of the largest side, one or two more than max_request_pixels allows."""
        side = spec.max_image_side
        n = spec.max_request_pixels // side**2 + draw(st.integers(1, 2))
        return Request(signature, strings([png_header(side, side)] * n),
                       f"{signature} {n} png_header({side}, {side})", None,
                       frozenset({"max_request_pixels"}))

    kinds = [batch()] * 16 + [rank(), other_dtype(), over_max_batch(),
                              over_max_request_bytes(), over_max_request_pixels()]
    return st.sampled_from(range(len(kinds))).flatmap(kinds.__getitem__)


STRATEGIES = {"serving_default": serving_default_requests,
              "classify_raw": classify_raw_requests,
              "classify_encoded": classify_encoded_requests}


# ---------------------------------------------------------------------------------------------
# gRPC-shaped hazards: a TensorProto whose declared shape is huge or disagrees with its content.

def _proto(array: Any, dims: list[int] | None = None, unknown_rank: bool = False):
    proto = tf.make_tensor_proto(array)
    if dims is not None:
        del proto.tensor_shape.dim[:]
        for size in dims:
            proto.tensor_shape.dim.add(size=size)
    proto.tensor_shape.unknown_rank = unknown_rank
    return proto


def _broadcast_proto(dtype: tf.DType, dims: list[int], value: Any):
    """One value and a declared shape: TensorFlow (and TF Serving's Tensor::FromProto)
    fills the declared shape with it."""
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, {tf.float32: "float_val", tf.string: "string_val"}[dtype]).append(value)
    return proto


def hazard_protos() -> dict[str, tuple[Any, tf.DType, str]]:
    """name -> (TensorProto, dtype to parse as, signature it would be sent to)."""
    one = np.zeros((1, 32, 32, 1), np.float32)
    png = tf.io.encode_png(np.zeros((28, 28, 1), np.uint8)).numpy()
    short = _proto(one)
    short.tensor_content = short.tensor_content[:4095]
    return {
        "content_shorter_than_shape": (_proto(one, [4, 32, 32, 1]), tf.float32,
                                       "serving_default"),
        "batch_dim_2e40": (_proto(one, [2**40, 32, 32, 1]), tf.float32, "serving_default"),
        "dims_overflow_int64": (_proto(one, [2**62, 2**62, 32, 1]), tf.float32,
                                "serving_default"),
        "negative_dim": (_proto(one, [-3, 32, 32, 1]), tf.float32, "serving_default"),
        "rank_255": (_proto(np.zeros(1, np.float32), [1] * 255), tf.float32,
                     "serving_default"),
        "unknown_rank_with_content": (_proto(one, unknown_rank=True), tf.float32,
                                      "serving_default"),
        "content_not_whole_elements": (short, tf.float32, "serving_default"),
        "dtype_double_sent_as_float": (_proto(one.astype(np.float64)), tf.float32,
                                       "serving_default"),
        # 2^38 floats (1 TiB) from one value: refused by the allocator, never filled
        "one_value_declared_1tib": (_broadcast_proto(tf.float32, [2**28, 32, 32, 1], 0.5),
                                    tf.float32, "serving_default"),
        # 16 MiB from a 30-byte proto: answered by the graph's max_batch refusal
        "one_value_declared_4096_images": (_broadcast_proto(tf.float32, [4096, 32, 32, 1],
                                                            0.5), tf.float32,
                                           "serving_default"),
        "one_string_declared_2e40": (_broadcast_proto(tf.string, [2**40], png), tf.string,
                                     "classify_encoded"),
        "three_strings_declared_5": (_proto(strings([png] * 3), [5]), tf.string,
                                     "classify_encoded"),
        "valid_nan_image": (_proto(np.full((1, 32, 32, 1), np.nan, np.float32)), tf.float32,
                            "serving_default"),
    }


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1][:200]}"


def tensor_proto_hazards(signatures: dict | None = None) -> dict[str, dict]:
    """Each hazard proto serialized, parsed back as a server would (tf.io.parse_tensor: the
    C++ Tensor::FromProto) and with tf.make_ndarray, then, when parsed and `signatures` are
    given, sent to its signature. name -> {"proto_bytes", "parse_tensor", "make_ndarray":
    "ok [shape]" or "Error: message", "signature": {"answered": {reason: rows}} or
    {"refused": message class}}."""
    results = {}
    for name, (proto, dtype, signature) in hazard_protos().items():
        serialized = proto.SerializeToString()
        result = {"proto_bytes": len(serialized)}
        parsed = None
        try:
            parsed = tf.io.parse_tensor(serialized, dtype)
            result["parse_tensor"] = f"ok {parsed.shape.as_list()}"
        except Exception as e:  # recorded; the caller asserts which are allowed
            result["parse_tensor"] = _describe(e)
        try:
            result["make_ndarray"] = f"ok {list(tf.make_ndarray(proto).shape)}"
        except Exception as e:
            result["make_ndarray"] = _describe(e)
        if parsed is not None and signatures is not None:
            try:
                out = signatures[signature](images=parsed)
                result["signature"] = {"answered": dict(Counter(
                    r.decode() for r in out["reason"].numpy()))}
            except Exception as e:  # classified: the caller asserts which are allowed
                result["signature"] = {"refused": classify_refusal(e)[0]}
            del parsed
        results[name] = result
    return results


# ---------------------------------------------------------------------------------------------
# The worker.

def _vm_rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reference_requests(pool: Pool, spec: Spec) -> dict[str, Request]:
    """A valid request per signature, answered before and after the fuzz run."""
    raw = pool.raw[:8]
    encoded = strings([tf.io.encode_png(image).numpy() for image in raw])
    return {"serving_default": Request("serving_default", pool.floats[:8], "8 real images",
                                       [VALID] * 8),
            "classify_raw": Request("classify_raw", raw, "8 real images", [VALID] * 8),
            "classify_encoded": Request("classify_encoded", encoded, "8 real PNGs",
                                        [VALID] * 8)}


def fuzz(model_dir: str, spec: Spec, pool: Pool, cases: int, seed_value: int,
         largest_batch: int, journal: pathlib.Path | None = None, hazards: bool = True
         ) -> dict:
    """Loads the SavedModel and runs `cases` generated requests (split evenly over the three
    signatures; valid batches up to `largest_batch`); the figures as a JSON-able dict."""
    start_all = time.perf_counter()
    loaded = tf.saved_model.load(model_dir)
    signatures = {name: loaded.signatures[name] for name in SIGNATURES}
    references = _reference_requests(pool, spec)
    before = {name: call(signatures[name], r) for name, r in references.items()}
    for name, outcome in before.items():
        assert outcome.outputs is not None, f"{name} refused a valid request: {outcome.message}"
    baseline_peak, baseline_rss = peak_mib(), _vm_rss_mib()
    figures: dict[str, Any] = {
        "seed": seed_value, "largest_batch": largest_batch, "cases": {}, "outcomes": {},
        "rows_by_reason": {},
        "worst_seconds_batch_le_64": {}, "worst_cpu_seconds_batch_le_64": {},
        "worst_seconds_any": {}, "failures": [],
        "failure_count": 0, "post_load_peak_rss_mib": round(baseline_peak, 1),
        "rss_growth_trace_mib": []}  # (cases run, VmRSS growth) every 250 cases
    log = open(journal, "w") if journal else None  # noqa: SIM115 - kept open for the run
    worst_growth = (0.0, "")

    def run_case(name: str, index: int, request: Request) -> None:
        nonlocal worst_growth
        if log:  # before the call: an abort leaves the culprit in the journal
            log.seek(0)
            log.write(f"{name} case {index} (seed {seed_value}): {request.what[:2000]}\n")
            log.truncate()
            log.flush()
        outcome = call(signatures[name], request)
        problems = check(request, outcome, spec)
        growth = peak_mib() - baseline_peak
        if growth > worst_growth[0]:
            worst_growth = (growth, request.what[:300])
            if growth > RSS_BUDGET_MIB and "rss_budget_exceeded" not in figures:
                # once: every later case would repeat it
                problems.append(f"peak resident memory grew {growth:.0f} MiB over the "
                                f"post-load baseline (budget {RSS_BUDGET_MIB} MiB)")
                figures["rss_budget_exceeded"] = {"signature": name, "case": index,
                                                  "growth_mib": round(growth, 1)}
        ran = sum(sum(c.values()) for c in figures["outcomes"].values())
        if ran % 250 == 0:
            figures["rss_growth_trace_mib"].append((ran, round(_vm_rss_mib() - baseline_rss)))
        counts = figures["outcomes"].setdefault(name, Counter())
        counts["answered" if outcome.outputs is not None else f"refused:{outcome.refusal}"] += 1
        if outcome.outputs is not None:
            figures["rows_by_reason"].setdefault(name, Counter()).update(
                r.decode() for r in outcome.outputs["reason"])
        small = request.rows is not None and len(request.rows) <= LATENCY_BATCH
        for slot, key in (("worst_seconds_batch_le_64", "seconds"),
                          ("worst_cpu_seconds_batch_le_64", "cpu_seconds"),
                          ("worst_seconds_any", "seconds")):
            if (small or slot.endswith("_any")) and getattr(outcome, key) > figures[slot].get(
                    name, {}).get(key, -1):
                figures[slot][name] = {"seconds": round(outcome.seconds, 4),
                                       "cpu_seconds": round(outcome.cpu_seconds, 4),
                                       "what": request.what[:300]}
        if problems:
            figures["failure_count"] += 1
            if len(figures["failures"]) < 20:
                figures["failures"].append({"signature": name, "case": index,
                                            "seed": seed_value, "what": request.what[:2000],
                                            "problems": problems})

    def run_signature(name: str, count: int, seed_of_signature: int) -> int:
        """Runs `count` generated requests on `name`; how many ran."""
        done = 0

        # Generation only: a failing case is counted and recorded, not shrunk.
        @seed(seed_of_signature)
        @settings(max_examples=max(count, 1), database=None, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                  verbosity=Verbosity.quiet, print_blob=False)
        @given(STRATEGIES[name](pool, spec, largest_batch))
        def one(request: Request) -> None:
            nonlocal done
            if done < count:
                run_case(name, done, request)
                done += 1

        one()
        return done

    for offset, name in enumerate(SIGNATURES):
        count = cases // len(SIGNATURES) + (offset < cases % len(SIGNATURES))
        figures["cases"][name] = run_signature(name, count, seed_value + offset)
    if log:
        log.close()
    after = {name: call(signatures[name], r) for name, r in references.items()}
    figures["still_answers"] = {name: _same_answer(before[name], after[name])
                                for name in SIGNATURES}
    if hazards:
        figures["tensor_proto_hazards"] = tensor_proto_hazards(signatures)
    figures["peak_rss_growth_mib"] = round(peak_mib() - baseline_peak, 1)
    figures["peak_rss_growth_by"] = worst_growth[1]
    figures["rss_growth_mib"] = round(_vm_rss_mib() - baseline_rss, 1)
    figures["seconds"] = round(time.perf_counter() - start_all, 1)
    figures["refused_by_class"] = sum((Counter({k.split(":", 1)[1]: v for k, v in c.items()
                                                if k.startswith("refused:")})
                                       for c in figures["outcomes"].values()), Counter())
    forbidden = [m for m in ("sdim_tf", "tensorflow_probability", "pipeline")
                 if m in sys.modules]
    assert not forbidden, f"the worker imported {forbidden}"
    return json.loads(json.dumps(figures))  # Counters -> plain dicts


def _same_answer(first: Outcome, second: Outcome) -> bool:
    if first.outputs is None or second.outputs is None:
        return False
    a, b = first.outputs, second.outputs
    return all(np.array_equal(a[k], b[k]) for k in ("class_ids", "rejected", "reason")) \
        and np.allclose(a["class_scores"], b["class_scores"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The parent's side.

def real_images(data_dir: str | None = None) -> np.ndarray:
    """uint8 [64, 28, 28, 1]: 48 Fashion-MNIST and 16 MNIST test images (SDIM_DATA_DIR)."""
    from sdim_tf import data

    fashion, _ = data.load_split("fashion_mnist", "test", data_dir)
    digits, _ = data.load_split("mnist", "test", data_dir)
    return np.concatenate([fashion[:48], digits[:16]])


@dataclasses.dataclass
class WorkerResult:
    returncode: int  # negative: killed by that signal
    figures: dict | None
    stderr: str
    last_case: str  # the journal: the case running when the worker ended

    def describe(self) -> str:
        return (f"worker exited {self.returncode}; last case: {self.last_case}\n"
                f"{self.stderr[-3000:]}")


def run_worker(model_dir: pathlib.Path, module, raw: np.ndarray, cases: int, seed_value: int,
               workdir: pathlib.Path, largest_batch: int | None = None,
               timeout: float = 3600) -> WorkerResult:
    """Runs the fuzz worker (a TensorFlow-only process) against `model_dir`, the export of
    `module`; `raw` are real uint8 images at the source size; valid batches up to
    `largest_batch` (default max_batch)."""
    from sdim_tf import data

    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, images_path = workdir / "spec.json", workdir / "images.npz"
    journal = workdir / "journal.txt"
    spec_path.write_text(json.dumps(Spec.of(module).to_json()))
    np.savez(images_path, raw=raw, floats=data.preprocess(raw).numpy())
    command = [sys.executable, "-m", "bench.fuzz_signatures", str(model_dir), str(spec_path),
               str(images_path), f"--cases={cases}", f"--seed={seed_value}",
               f"--journal={journal}",
               f"--largest_batch={largest_batch or module.limits.max_batch}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"))
    figures = None
    if result.returncode == 0:
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    return WorkerResult(result.returncode, figures, result.stderr,
                        journal.read_text() if journal.exists() else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="the SavedModel (omit with --hazards)")
    parser.add_argument("spec", nargs="?", help="Spec JSON written by the parent")
    parser.add_argument("images", nargs="?", help="npz of real images: raw, floats")
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--journal", type=pathlib.Path)
    parser.add_argument("--largest_batch", type=int, help="of the valid batches (default "
                        "max_batch; at 1024 one request holds ~0.4 GiB of activations)")
    parser.add_argument("--hazards", action="store_true",
                        help="only the TensorProto hazards, without a model")
    parser.add_argument("--address_space_gib", type=float, default=32,
                        help="RLIMIT_AS: an allocation the fuzz provokes fails instead of "
                             "paging out the machine (with Linux's heuristic overcommit, "
                             "one over RAM + swap fails anyway)")
    args = parser.parse_args(argv)
    limit = int(args.address_space_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    if args.hazards:
        figures = {"tensor_proto_hazards": tensor_proto_hazards()}
    else:
        spec = Spec.from_json(json.loads(pathlib.Path(args.spec).read_text()))
        with np.load(args.images, allow_pickle=False) as arrays:
            pool = Pool(arrays["raw"], arrays["floats"])
        figures = fuzz(args.model_dir, spec, pool, args.cases, args.seed,
                       args.largest_batch or spec.max_batch, args.journal)
    assert "sdim_tf" not in sys.modules
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
