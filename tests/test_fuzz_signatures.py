"""Signature fuzzing: hypothesis-generated requests, from a fixed seed, against a
SavedModel exported from an untrained SDIM (the real architecture, thresholds at the median
score so that rows are both accepted and rejected), answered by a TensorFlow-only process
(bench/fuzz_signatures.py). The oracle and the property checker are tested first, on
requests and answers built by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from bench import fuzz_signatures as fs
from bench import untrained
from sdim_tf import data, encoded, serving
from tests.references import saved_model_cli_answers

CASES, SEED = 600, 20
# Valid batches up to 256, the default max_batch: a batch of 1024 (the default before) held
# ~0.4 GiB of activations and broke the memory budget. Requests over max_batch are still
# sent (they are refused before any computation).
LARGEST_BATCH = 256


def _spec(thresholds=(0.0,) * 10) -> fs.Spec:
    return fs.Spec(reasons=frozenset(serving.REASONS), thresholds=tuple(thresholds),
                   class_names=tuple(f"c{i}" for i in range(len(thresholds))),
                   channels=1, source_size=(28, 28), image_size=data.IMAGE_SIZE,
                   jpeg_scan_bytes=encoded.JPEG_SCAN_BYTES,
                   jpeg_max_segments=encoded.JPEG_MAX_SEGMENTS,
                   **dataclasses.asdict(serving.Limits()))


# --- the oracle -------------------------------------------------------------------------------

FORGED = {
    "png 16000 x 16000": (fs.png_header(16000, 16000), "too_large"),
    "png 28 x 28, no pixels": (fs.png_header(28, 28), None),
    "png width 0": (fs.png_header(0, 5), "bad_header"),
    "png 4096 x 4096": (fs.png_header(4096, 4096), None),
    "png 4097 x 1": (fs.png_header(4097, 1), "too_large"),
    "png 2^32 - 1 wide": (fs.png_header(2**32 - 1, 1), "too_large"),
    "png signature only": (fs.PNG_MAGIC, "bad_header"),
    "gif": (b"GIF89a" + b"\0" * 20, "not_png_or_jpeg"),
    "empty": (b"", "not_png_or_jpeg"),
    "jpeg 5000 x 10": (fs.jpeg_header(5000, 10, []), "too_large"),
    "jpeg after segments": (fs.jpeg_header(28, 30, [(0xE1, b"x" * 100)] * 3), None),
    "jpeg frame after 63 segments": (fs.jpeg_header(28, 28, [(0xE0, b"")] * 63), None),
    "jpeg frame after 64 segments": (fs.jpeg_header(28, 28, [(0xE0, b"")] * 64),
                                     "bad_header"),
    "jpeg without frame": (fs.jpeg_header(0, 0, [(0xE0, b"ab")], frame=None), "bad_header"),
    "jpeg 70000 empty segments": (fs.jpeg_header(28, 28, [(0xE0, b"")] * 70000),
                                  "bad_header"),
    "one byte over max_image_bytes": (fs.png_header(28, 28).ljust((4 << 20) + 1, b"\0"),
                                      "too_large"),
    "jpeg progressive, 3 components": (fs.jpeg_header(28, 30, [], 0xC2, components=3), None),
    "jpeg lossless (SOF3)": (fs.jpeg_header(28, 28, [], 0xC3), "unsupported_jpeg"),
    "jpeg arithmetic (SOF9)": (fs.jpeg_header(28, 28, [], 0xC9), "unsupported_jpeg"),
    "jpeg 12-bit": (fs.jpeg_header(28, 28, [], precision=12), "unsupported_jpeg"),
    "jpeg 4 components": (fs.jpeg_header(28, 28, [], components=4), "unsupported_jpeg"),
    "jpeg 4 components, no size": (fs.jpeg_header(0, 28, [], components=4), "bad_header"),
    "jpeg 4 components, 5000 wide": (fs.jpeg_header(28, 5000, [], components=4),
                                     "unsupported_jpeg"),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_oracle_reads_headers_as_the_readme_says(name):
    element, reason = FORGED[name]
    assert fs.header_reason(element, _spec()) == reason


@pytest.mark.parametrize("name", [n for n in FORGED if not n.startswith("one byte")])
def test_oracle_agrees_with_the_graph(name):
    """The oracle is an independent reading: on these edge cases it gives the sizes
    sdim_tf.encoded.inspect reads in the graph."""
    element, _ = FORGED[name]
    kind, height, width = (int(t) for t in encoded.inspect(tf.constant(element)))
    if element.startswith(fs.PNG_MAGIC):
        assert (kind, height, width) == (encoded.PNG, *fs._png_size(element))
    elif element.startswith(fs.JPEG_MAGIC):
        height_read, width_read, decodable = fs._jpeg_frame(element, _spec())
        assert (kind, height, width) == (
            encoded.JPEG if decodable else encoded.UNSUPPORTED_JPEG, height_read, width_read)
    else:
        assert (kind, height, width) == (encoded.UNKNOWN, 0, 0)


@pytest.mark.parametrize("frame, precision, components, kind", [
    (0xC0, 8, 1, encoded.JPEG),  # baseline, grey
    (0xC0, 8, 3, encoded.JPEG),  # baseline, YCbCr
    (0xC1, 8, 3, encoded.JPEG),  # extended sequential
    (0xC2, 8, 1, encoded.JPEG),  # progressive
    (0xC3, 8, 1, encoded.UNSUPPORTED_JPEG),  # lossless
    (0xC9, 8, 1, encoded.UNSUPPORTED_JPEG),  # arithmetic coding
    (0xC0, 12, 1, encoded.UNSUPPORTED_JPEG),
    (0xC0, 8, 4, encoded.UNSUPPORTED_JPEG),  # CMYK
    (0xC0, 8, 2, encoded.UNSUPPORTED_JPEG),
])
def test_inspect_reads_which_jpeg_frames_decode(frame, precision, components, kind):
    header = bytes([0xFF, frame, 0, 8 + 3 * components, precision, 0, 28, 0, 30, components])
    element = b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + header + bytes(3 * components)
    assert [int(t) for t in encoded.inspect(tf.constant(element))] == [kind, 28, 30]


def _decodes_as_grey(element: bytes) -> bool:
    try:
        tf.io.decode_image(element, channels=1)
    except tf.errors.InvalidArgumentError:
        return False
    return True


def test_inspect_agrees_with_the_decoder_on_real_jpegs():
    """JPEG from the header exactly when the decoder reads the file as grey."""
    image = np.arange(28 * 30, dtype=np.uint8).reshape(28, 30, 1)
    files = {"grey": tf.io.encode_jpeg(image).numpy(),
             "rgb progressive": tf.io.encode_jpeg(np.repeat(image, 3, -1),
                                                  progressive=True).numpy(),
             "cmyk": fs._pil(image, "JPEG", "CMYK")}
    decodes = {name: _decodes_as_grey(element) for name, element in files.items()}
    assert decodes == {"grey": True, "rgb progressive": True, "cmyk": False}
    for name, element in files.items():
        kind = int(encoded.inspect(tf.constant(element))[0])
        assert kind == (encoded.JPEG if decodes[name] else encoded.UNSUPPORTED_JPEG), name


def test_the_oracle_predicts_the_pixel_budget():
    spec = _spec()
    side = spec.max_image_side
    header = fs.png_header(side, side)
    budget_images = spec.max_request_pixels // side**2
    assert fs.request_pixels([header] * budget_images, spec) == budget_images * side**2
    # refused rows do not count
    assert fs.request_pixels([header, fs.png_header(16000, 16000), b"GIF89a"], spec) == side**2
    assert fs.request_pixels([header] * (budget_images + 1), spec) > spec.max_request_pixels


def test_float_rows_get_their_reason():
    images = np.full((6, 32, 32, 1), 0.5, np.float32)
    images[0, 1, 2, 0] = np.nan
    images[1, 0, 0, 0] = 1.0000001
    images[2, 0, 0, 0] = -1e-45  # TensorFlow may flush it to -0.0: in range
    images[3, 0, 0, 0] = -0.0
    images[4, 5, 5, 0] = -np.inf
    rows = fs.float_row_reasons(images)
    assert rows == [{"non_finite"}, {"out_of_range"}, {"out_of_range", "", "unfamiliar",
                                                       "ambiguous"},
                    fs.VALID, {"non_finite"}, fs.VALID]
    assert fs.float_row_reasons(np.zeros((0, 32, 32, 1), np.float32)) == []


# --- the property checker ---------------------------------------------------------------------

def _answer() -> dict[str, np.ndarray]:
    """A correct answer to 4 rows: accepted, below threshold, non-finite input, and above
    threshold with a gap of 0.5 below min_gap 1."""
    scores = np.array([[1.0, 3.0], [2.0, 0.5], [-np.inf, -np.inf], [2.5, 3.0]], np.float32)
    return {"class_scores": scores,
            "probabilities": np.array([[0.1, 0.9], [0.8, 0.2], [0, 0], [0.4, 0.6]], np.float32),
            "class_ids": np.array([1, 0, 0, 1]),
            "class_name": np.array([b"c1", b"c0", b"c0", b"c1"], object),
            "score": np.array([3.0, 2.0, -np.inf, 3.0], np.float32),
            "threshold": np.array([2.5, 2.5, 2.5, 2.5], np.float32),
            "gap": np.array([2.0, 1.5, -np.inf, 0.5], np.float32),
            "min_gap": np.array([1.0, 1.0, 1.0, 1.0], np.float32),
            "rejected": np.array([False, True, True, True]),
            "reason": np.array([b"", b"unfamiliar", b"non_finite", b"ambiguous"], object)}


def _answered(outputs, seconds=0.01, cpu_seconds=0.01) -> fs.Outcome:
    return fs.Outcome(outputs, None, "", seconds, cpu_seconds)


ROWS = [fs.VALID, fs.VALID, frozenset({"non_finite"}), fs.VALID]


def _request(rows=ROWS, refusals=frozenset()) -> fs.Request:
    return fs.Request("serving_default", np.zeros((4, 32, 32, 1), np.float32), "by hand", rows,
                      refusals)


def _broken(change) -> dict[str, np.ndarray]:
    out = _answer()
    change(out)
    return out


VIOLATIONS = {
    "unknown reason": (lambda o: o["reason"].__setitem__(1, b"bogus"), "not among"),
    "rejected against the rule": (lambda o: o["rejected"].__setitem__(0, True), "rejected !="),
    "class_ids int32": (lambda o: o.__setitem__("class_ids", o["class_ids"].astype(np.int32)),
                        "class_ids: int32"),
    "missing output": (lambda o: o.pop("probabilities"), "not the documented"),
    "invalid row with a score": (lambda o: o["class_scores"].__setitem__((2, 0), 1.0),
                                 "not -inf"),
    "threshold not deployed": (lambda o: o["threshold"].__setitem__(0, 2.0), "disagree"),
    "gap not the two best scores": (lambda o: o["gap"].__setitem__(0, 1.0), "disagree"),
    "ambiguous row accepted": (lambda o: o["rejected"].__setitem__(3, False), "rejected !="),
    "ambiguous called unfamiliar": (lambda o: o["reason"].__setitem__(3, b"unfamiliar"),
                                    "unfamiliar/ambiguous"),
    "invalid row with a gap": (lambda o: o["gap"].__setitem__(2, 0.0), "not -inf"),
    "wrong reason for the row": (lambda o: o["reason"].__setitem__(2, b"out_of_range"),
                                 "unexpected reason"),
    "class_name of another class": (lambda o: o["class_name"].__setitem__(0, b"c0"),
                                    "class_name is not"),
    "probabilities peak elsewhere": (lambda o: o["probabilities"].__setitem__(
        0, np.array([0.9, 0.1], np.float32)), "peak at another class"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_checker_catches_a_wrong_answer(name):
    change, words = VIOLATIONS[name]
    spec = _spec((2.5, 2.5))
    assert fs.check(_request(), _answered(_answer()), spec) == []
    problems = fs.check(_request(), _answered(_broken(change)), spec)
    assert problems and words in " ".join(problems), problems


def test_checker_catches_wrong_refusals_and_slow_answers():
    spec = _spec((2.5, 2.5))
    assert "took 2.50 s (2.10 s of CPU)" in fs.check(
        _request(), _answered(_answer(), 2.5, 2.1), spec)[0]
    # slow on the wall clock only: a contended machine, not a slow request
    assert fs.check(_request(), _answered(_answer(), 2.5, 0.3), spec) == []
    must_refuse = _request(None, frozenset({"max_batch"}))
    assert "must be refused" in fs.check(must_refuse, _answered(_answer()), spec)[0]
    for refusal in ("unnamed", "decode", "other:RuntimeError"):
        outcome = fs.Outcome(None, refusal, "message", 0.01, 0.01)
        assert "refused" in fs.check(_request(), outcome, spec)[0]
        assert fs.check(_request(ROWS, frozenset({refusal})), outcome, spec) == []


def test_refusals_are_classified_by_what_their_message_names():
    def invalid(message):
        return tf.errors.InvalidArgumentError(None, None, message)

    suffix = " [Op:__inference_signature_wrapper__serving_default_672]"
    assert fs.classify_refusal(invalid(
        "assertion failed: [serving_default: images must be [batch, 32, 32, 1] ...]" + suffix)
    )[0] == "shape"
    # the suffix names the signature whatever failed: it does not count
    assert fs.classify_refusal(invalid(
        "slice index 0 of dimension 0 out of bounds." + suffix))[0] == "unnamed"
    assert fs.classify_refusal(invalid(
        "jpeg::Uncompress failed. Invalid JPEG data or crop window." + suffix))[0] == "decode"
    assert fs.classify_refusal(invalid(
        "assertion failed: [classify_encoded: at most max_request_pixels=33554432 decoded "
        "pixels per request, as the headers declare] [got] [50331648]" + suffix)
    )[0] == "max_request_pixels"
    assert fs.classify_refusal(invalid(
        "cannot compute __inference_signature_wrapper__classify_raw_1 as input #0(zero-based) "
        "was expected to be a uint8 tensor but is a float tensor" + suffix))[0] == "dtype"
    assert fs.classify_refusal(TypeError("x"))[0] == "python"
    assert fs.classify_refusal(RuntimeError("x"))[0] == "other:RuntimeError"


# --- the fuzz run -----------------------------------------------------------------------------

def _digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
    raw = fs.real_images(str(data_dir))
    path, module = untrained.export(tmp_path_factory.mktemp("fuzz") / "saved_models", "fuzz",
                                    raw)
    return path, module, raw


@pytest.fixture(scope="module")
def fuzzed(exported, tmp_path_factory):
    path, module, raw = exported
    before = _digest(path)
    result = fs.run_worker(path, module, raw, CASES, SEED, tmp_path_factory.mktemp("worker"),
                           largest_batch=LARGEST_BATCH, timeout=900)
    return result, before


def test_worker_survives_and_every_answer_holds_the_property(fuzzed):
    result, _ = fuzzed
    # negative: killed by a signal (a CHECK failure aborts); the journal names the case
    assert result.returncode == 0, result.describe()
    figures = result.figures
    assert figures["failure_count"] == 0, figures["failures"]
    assert "rss_budget_exceeded" not in figures


def test_the_run_covers_every_signature_and_outcome(fuzzed):
    figures = fuzzed[0].figures
    assert figures["cases"] == {name: CASES // 3 for name in fs.SIGNATURES}
    outcomes = figures["outcomes"]
    for name in fs.SIGNATURES:
        assert outcomes[name]["answered"] > CASES // 12, outcomes[name]
        for refusal in ("shape", "max_batch"):
            assert outcomes[name].get(f"refused:{refusal}", 0) > 0, (name, refusal)
        # another dtype: refused by the signature, or by tf.constant (datetime64, ...)
        assert outcomes[name].get("refused:dtype", 0) + outcomes[name].get(
            "refused:python", 0) > 0, name
    assert outcomes["classify_encoded"]["refused:decode"] > 0
    assert outcomes["classify_encoded"]["refused:max_request_bytes"] > 0
    assert outcomes["classify_encoded"]["refused:max_request_pixels"] > 0
    rows = figures["rows_by_reason"]
    for name in fs.SIGNATURES:  # the median thresholds accept and reject real rows
        assert rows[name][""] > 0 and rows[name]["unfamiliar"] > 0, rows[name]
    assert rows["serving_default"]["non_finite"] > 0
    assert rows["serving_default"]["out_of_range"] > 0
    for reason in ("not_png_or_jpeg", "bad_header", "too_large", "unsupported_jpeg"):
        assert rows["classify_encoded"][reason] > 0, reason


def test_the_memory_budget_is_checked_up_to_the_default_max_batch():
    """Every batch size the default limits admit is fuzzed here, so the memory budget below
    holds for them (at max_batch=1024 it did not)."""
    assert LARGEST_BATCH >= serving.Limits().max_batch


def test_latency_and_memory_stay_bounded(fuzzed):
    figures = fuzzed[0].figures
    for name in fs.SIGNATURES:  # wall and CPU time both over it: a slow request
        for slot in ("worst_seconds_batch_le_64", "worst_cpu_seconds_batch_le_64"):
            worst = figures[slot][name]
            assert min(worst["seconds"], worst["cpu_seconds"]) < fs.MAX_SECONDS, worst
    assert figures["peak_rss_growth_mib"] < fs.RSS_BUDGET_MIB
    assert figures["post_load_peak_rss_mib"] > 0


def test_the_tensorflow_only_process_still_answers_at_the_end(fuzzed):
    """The same valid request per signature, before and after the run: the same answer."""
    assert fuzzed[0].figures["still_answers"] == {name: True for name in fs.SIGNATURES}


def test_grpc_shaped_requests_with_lying_shapes_reach_the_model_safely(fuzzed):
    """TensorProtos parsed as TF Serving parses them (tf.io.parse_tensor), then sent; the
    others are refused by the parser (tests/test_tf_hazards.py)."""
    hazards = fuzzed[0].figures["tensor_proto_hazards"]
    sent = {name: h["signature"] for name, h in hazards.items() if "signature" in h}
    assert set(sent) == {"unknown_rank_with_content", "one_value_declared_4096_images",
                         "three_strings_declared_5", "valid_nan_image"}
    # a 27-byte proto declaring 4096 images: parsed to 16 MiB, refused before any work
    assert sent["one_value_declared_4096_images"] == {"refused": "max_batch"}
    assert sent["valid_nan_image"] == {"answered": {"non_finite": 1}}
    for name in ("unknown_rank_with_content", "three_strings_declared_5"):
        answered = sent[name]["answered"]
        assert set(answered) <= fs.VALID, answered
    assert sum(sent["three_strings_declared_5"]["answered"].values()) == 5
    refused = [n for n, h in hazards.items() if h["parse_tensor"].startswith("InvalidArgument")]
    assert len(refused) == len(hazards) - len(sent) == 9


def test_saved_model_cli_still_answers_after_the_fuzz(fuzzed, exported, tmp_path):
    result, before = fuzzed
    path, _, raw = exported
    assert result.returncode == 0
    assert _digest(path) == before  # serving read the SavedModel, never wrote it
    saved_model_cli_answers(path, data.preprocess(raw[:3]).numpy(), tmp_path)
