"""The exported SavedModel: plain-TF loading, signatures, bad input, versions, warmup."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from bench import untrained
from bench.header_bombs import png_header
from pipeline import artifacts, deployed
from pipeline.run_dir import Run
from pipeline.stages import export
from sdim_tf import data, publish, serving
from tests.references import saved_model_cli_answers

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_run, data_dir):
    config, run_dir = tiny_run
    info = Run(run_dir).export.record()
    module = Run(run_dir).deployable()  # what export wrote, built in memory
    fashion, _ = data.load_split("fashion_mnist", "test", str(data_dir))
    digits, _ = data.load_split("mnist", "test", str(data_dir))
    raw = np.concatenate([fashion[:48], digits[:16]])  # uint8 [64, 28, 28, 1]
    return pathlib.Path(info["path"]), module, raw


@pytest.fixture(scope="module")
def untrained_module():
    """An untrained SDIM in memory: what is refused, and how rows of one batch relate, does
    not depend on the weights (and it needs no training run)."""
    return serving.RejectingClassifier(untrained.model(), np.zeros(10), 1, (28, 28))


def _encode(raw):
    return np.array([tf.io.encode_png(image).numpy() for image in raw], dtype=object)


def test_plain_tensorflow_process_gives_the_in_memory_answers(exported, tmp_path):
    path, module, raw = exported
    inputs = {"serving_default": data.preprocess(raw).numpy(), "classify_raw": raw,
              "classify_encoded": _encode(raw)}
    np.savez(tmp_path / "in.npz", **inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "load_saved_model.py"), str(path),
         str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for name in serving.SIGNATURES:
        expected = getattr(module, name)(tf.constant(inputs[name]))
        # float32 graph vs the same graph: scores of several hundred agree to 1e-4.
        np.testing.assert_allclose(got[f"{name}/class_scores"],
                                   expected["class_scores"].numpy(), rtol=1e-4,
                                   atol=1e-4 * np.abs(expected["class_scores"].numpy()).max())
        np.testing.assert_array_equal(got[f"{name}/class_ids"], expected["class_ids"].numpy())
        np.testing.assert_array_equal(got[f"{name}/rejected"], expected["rejected"].numpy())
        # the restored tf.function (README's faster Python call) runs the same graph
        for key in [k for k in got.files if k.startswith(f"{name}/")]:
            np.testing.assert_array_equal(got[f"function_{key}"], got[key], err_msg=key)
    # The three ways in are one model: PNG and raw uint8 give the float signature's answer.
    for name in ("classify_raw", "classify_encoded"):
        np.testing.assert_allclose(got[f"{name}/class_scores"],
                                   got["serving_default/class_scores"], rtol=1e-5,
                                   atol=1e-5 * np.abs(got["serving_default/class_scores"]).max())
    out = {k.split("/")[1]: got[k] for k in got.files if k.startswith("serving_default/")}
    np.testing.assert_array_equal(out["class_ids"], out["class_scores"].argmax(1))
    np.testing.assert_allclose(out["score"], out["class_scores"].max(1))
    names = np.array(module.class_names)
    assert out["class_name"].astype(str).tolist() == names[out["class_ids"]].tolist()
    thresholds = module.thresholds.numpy()
    np.testing.assert_array_equal(out["threshold"], thresholds[out["class_ids"]])
    np.testing.assert_array_equal(out["rejected"], out["score"] < out["threshold"])
    # softmax of the deployed scores: it peaks at class_ids (the head's own log-likelihoods,
    # which may name another class, are no output)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-5)
    rows = np.arange(len(out["class_ids"]))
    np.testing.assert_array_equal(out["probabilities"][rows, out["class_ids"]],
                                  out["probabilities"].max(1))
    assert not {"log_likelihoods", "max_log_likelihood"} & set(out)


def test_deployed_scores_are_the_calibrated_scorers(exported, tiny_run):
    """class_scores are the fitted density's and the thresholds the calibrated ones (on this
    run's default --score=feature_density)."""
    _, module, raw = exported
    _, run_dir = tiny_run
    images = data.preprocess(raw).numpy()
    out = module.serving_default(tf.constant(images))
    scores = Run(run_dir).scoring_model().predict(images, verbose=0)
    np.testing.assert_allclose(out["class_scores"].numpy(), scores, rtol=1e-4,
                               atol=1e-4 * np.abs(scores).max())
    saved = artifacts.read_json(run_dir / "calibrate" / "thresholds.json")
    key = saved["deployed"]["percentile"]
    thresholds = np.array(saved["percentiles"][key]["thresholds"], np.float64)
    np.testing.assert_array_equal(module.thresholds.numpy(), thresholds.astype(np.float32))
    assert module.class_names == artifacts.read_json(
        run_dir / "ingest" / "metadata.json")["class_names"]
    np.testing.assert_array_equal(out["rejected"].numpy(),
                                  scores.max(1) < thresholds[scores.argmax(1)])


def test_saved_model_cli(exported, tmp_path):
    path, _, raw = exported
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    shown = subprocess.run([str(cli), "show", "--dir", str(path), "--all"],
                           capture_output=True, text=True, timeout=300, check=True).stdout
    for name, dtype in (("serving_default", "DT_FLOAT"), ("classify_raw", "DT_UINT8"),
                        ("classify_encoded", "DT_STRING")):
        block = shown.split(f"signature_def['{name}']")[1].split("signature_def[")[0]
        assert f"dtype: {dtype}" in block and "outputs['rejected']" in block
        assert "shape: (-1, 10)" in block  # class_scores and probabilities
        assert "outputs['class_name']" in block and "log_likelihood" not in block
    saved_model_cli_answers(path, data.preprocess(raw[:3]).numpy(), tmp_path)


def test_warmup_requests_are_answered(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    path, _, _ = exported
    loaded = tf.saved_model.load(str(path))
    records = list(tf.data.TFRecordDataset(
        str(path / "assets.extra" / export.WARMUP_FILE)).as_numpy_iterator())
    assert len(records) == 2
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record)
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        images = tf.make_ndarray(request.inputs["images"])
        outputs = loaded.signatures["serving_default"](images=tf.constant(images))
        assert outputs["class_ids"].shape[0] == images.shape[0] > 0
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    saved = json.loads((path / "assets" / "thresholds.json").read_text())
    deployed = saved["deployed"]["percentile"]
    assert card["rejection"]["percentile"] == deployed and len(card["class_names"]) == 10
    assert card["rejection"]["thresholds"] == saved["percentiles"][deployed]["thresholds"]
    # The SavedModel applies exactly those thresholds.
    thresholds = np.array([np.inf if t is None else t for t in card["rejection"]["thresholds"]])
    np.testing.assert_allclose(outputs["threshold"].numpy(),
                               thresholds[outputs["class_ids"].numpy()], rtol=1e-6)
    assert saved["percentiles"]["2"]
    # the tiny run was not trained against attackers, and its card says so
    assert card["threat_model"]["trained_against"] is None
    assert card["training"]["robust_epsilon"] == 0


@pytest.mark.parametrize("shape,signature,dtype", [
    ((2, 28, 28, 1), "serving_default", tf.float32),
    ((2, 32, 32, 3), "serving_default", tf.float32),
    ((32, 32, 1), "serving_default", tf.float32),
    ((2, 32, 32, 1), "classify_raw", tf.uint8),
])
def test_wrong_shapes_are_invalid_argument(exported, shape, signature, dtype):
    _, module, _ = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{signature}: images must be"):
        getattr(module, signature)(tf.zeros(shape, dtype))


def test_illegal_pixels_are_rejected_rows(exported):
    _, module, raw = exported
    images = data.preprocess(raw[:6]).numpy()
    clean = module.serving_default(tf.constant(images))
    images[1, 3, 3, 0] = np.nan
    images[2, 0, 0, 0] = np.inf
    images[3, 5, 5, 0] = 1.5
    images[4, 5, 5, 0] = -0.1
    out = module.serving_default(tf.constant(images))
    np.testing.assert_array_equal(out["rejected"].numpy()[1:5], True)
    assert out["reason"].numpy()[1:5].tolist() == [b"non_finite", b"non_finite",
                                                  b"out_of_range", b"out_of_range"]
    for row in (0, 5):  # a valid row's reason is the rule's
        assert out["reason"].numpy()[row] == (b"unfamiliar" if clean["rejected"][row]
                                              else b"")
    for row in (0, 5):  # the legal rows are answered as before
        np.testing.assert_array_equal(out["class_scores"][row], clean["class_scores"][row])
        assert out["rejected"][row] == clean["rejected"][row]


EMPTY = {"serving_default": tf.zeros((0, 32, 32, 1)),
         "classify_raw": tf.zeros((0, 28, 28, 1), tf.uint8),
         "classify_encoded": tf.constant([], tf.string)}


def test_empty_batch_gets_empty_outputs_on_every_signature(exported):
    """oneDNN's strided convolution mis-shapes an empty batch on AVX-512 CPUs: every
    signature, in memory and loaded from disk, answers with correctly shaped empty outputs."""
    path, module, _ = exported
    loaded = tf.saved_model.load(str(path))
    full = module.serving_default(tf.zeros((2, 32, 32, 1)))
    for name, images in EMPTY.items():
        for function in (getattr(module, name), loaded.signatures[name]):
            out = function(images=images) if function is loaded.signatures[name] \
                else function(images)
            assert set(out) == set(full)
            for key, value in out.items():
                assert value.shape == (0, *full[key].shape[1:]), (name, key)
                assert value.dtype == full[key].dtype, (name, key)


def _pil_bytes(image, fmt, mode=None, **kwargs):
    import io

    from PIL import Image

    out = io.BytesIO()
    picture = Image.fromarray(image[..., 0])
    (picture.convert(mode) if mode else picture).save(out, fmt, **kwargs)
    return out.getvalue()


def test_bad_elements_are_rejected_rows_and_the_rest_answered(exported):
    """Defects visible before decoding reject their row (with its reason) instead of failing
    the request; header bombs are refused before any decoding."""
    _, module, raw = exported
    png = _encode(raw[:2])
    frames = [_pil_bytes(raw[0], "GIF"), _pil_bytes(raw[0], "BMP"), _pil_bytes(raw[0], "WEBP"),
              _pil_bytes(raw[0], "GIF", save_all=True, append_images=[])]
    batch = [b"not an image", png[0], *frames, png[1], png_header(16000, 16000),
             png_header(5000, 10), b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JFIF",
             b"x" * (module.limits.max_image_bytes + 1)]
    out = module.classify_encoded(tf.constant(batch))
    assert out["reason"].numpy().tolist() == [
        b"not_png_or_jpeg", out["reason"].numpy()[1], b"not_png_or_jpeg", b"not_png_or_jpeg",
        b"not_png_or_jpeg", b"not_png_or_jpeg", out["reason"].numpy()[6], b"too_large",
        b"too_large", b"bad_header", b"bad_header", b"too_large"]
    alone = module.classify_encoded(tf.constant(png))
    for row, own in ((1, 0), (6, 1)):
        assert out["reason"].numpy()[row] in (b"", b"unfamiliar")
        for key in ("class_ids", "rejected", "reason"):
            assert out[key].numpy()[row] == alone[key].numpy()[own], key
        np.testing.assert_allclose(out["class_scores"].numpy()[row],
                                   alone["class_scores"].numpy()[own], rtol=1e-5)
    refused = np.ones(len(batch), bool)
    refused[[1, 6]] = False
    assert out["rejected"].numpy()[refused].all()
    assert np.isneginf(out["score"].numpy()[refused]).all()
    bombs = module.classify_encoded(tf.constant([png_header(16000, 16000)] * 8))
    assert bombs["reason"].numpy().tolist() == [b"too_large"] * 8


def test_an_unsupported_jpeg_is_a_rejected_row_and_the_rest_answered(untrained_module,
                                                                     data_dir):
    module = untrained_module
    raw, _ = data.load_split("fashion_mnist", "test", str(data_dir))
    cmyk = _pil_bytes(raw[0], "JPEG", mode="CMYK")
    with pytest.raises(tf.errors.InvalidArgumentError, match="jpeg::Uncompress failed"):
        tf.io.decode_image(cmyk, channels=1)  # it used to fail the whole request so
    valid = [tf.io.encode_png(raw[1]).numpy(), tf.io.encode_jpeg(raw[2]).numpy()]
    out = module.classify_encoded(tf.constant([cmyk, *valid]))
    alone = module.classify_encoded(tf.constant(valid))
    assert out["reason"].numpy()[0] == b"unsupported_jpeg"
    assert out["rejected"].numpy()[0] and np.isneginf(out["score"].numpy()[0])
    for key in ("class_ids", "rejected", "reason"):
        np.testing.assert_array_equal(out[key].numpy()[1:], alone[key].numpy(), key)
    np.testing.assert_allclose(out["class_scores"].numpy()[1:], alone["class_scores"].numpy(),
                               rtol=1e-5)


def _flat_png16(side: int, value: int) -> bytes:
    """A grey 16-bit PNG, side x side, every pixel `value` (as 8 bits) * 257."""
    return tf.io.encode_png(tf.fill([side, side, 1], tf.constant(value * 257, tf.uint16))
                            ).numpy()


def test_a_request_over_max_request_pixels_is_refused_before_decoding(untrained_module):
    module, limits = untrained_module, untrained_module.limits
    side, value = limits.max_image_side, 156
    assert 2 * side**2 <= limits.max_request_pixels < 3 * side**2  # the default's promise
    flat = _flat_png16(side, value)
    # a header bomb's row is refused alone and its pixels do not count
    two = module.classify_encoded(tf.constant([flat, flat, png_header(16000, 16000)]))
    assert two["reason"].numpy()[2] == b"too_large"
    # decoded, not blanks: a flat image's answer does not depend on its size
    small = module.serving_default(data.preprocess(np.full((1, 28, 28, 1), value, np.uint8)))
    np.testing.assert_allclose(two["class_scores"].numpy()[:2],
                               np.repeat(small["class_scores"].numpy(), 2, 0), rtol=1e-5)
    start = time.perf_counter()
    tf.io.decode_image(flat, channels=1)
    one_decode = time.perf_counter() - start
    for count in (3, 64):  # 64: within max_request_bytes, ~26 s to decode
        start = time.perf_counter()
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=f"max_request_pixels={limits.max_request_pixels} "):
            module.classify_encoded(tf.constant([flat] * count))
        assert time.perf_counter() - start < one_decode  # refused before any decoding


def test_request_limits_are_invalid_argument(exported):
    _, module, raw = exported
    limits = module.limits
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_batch"):
        module.serving_default(tf.zeros((limits.max_batch + 1, 32, 32, 1)))
    big = b"x" * limits.max_image_bytes
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_request_bytes"):
        module.classify_encoded(tf.constant(
            [big] * (limits.max_request_bytes // limits.max_image_bytes + 1)))


def test_second_export_is_a_new_version(exported, tmp_path):
    path, module, _ = exported

    def digest(folder):
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    first = publish.export(module, tmp_path, "m")
    before = digest(first)
    second = publish.export(module, tmp_path, "m")
    assert (first.name, second.name) == ("1", "2")
    assert digest(first) == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]  # no temp left


def _tf_serving_versions(model_dir: pathlib.Path) -> list[int]:
    """The versions TF Serving finds: children whose whole name parses as an int64
    (FileSystemStoragePathSource, ParseVersionNumber: strings::safe_strto64)."""
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if re.fullmatch(r"\s*[+-]?\d+\s*", p.name))


def test_an_export_removes_the_temporary_folders_of_killed_exports_only(
        untrained_module, tmp_path):
    model_dir = tmp_path / "m"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    stale = model_dir / f"{publish.TEMP_PREFIX}{dead}-{host}-a1b2c3d4"
    kept = [model_dir / f"{publish.TEMP_PREFIX}{os.getpid()}-{host}-e5f6g7h8",  # writing
            model_dir / f"{publish.TEMP_PREFIX}{dead}-elsewhere.example-i9j0k1l2",  # another host
            model_dir / f"{publish.TEMP_PREFIX}m3n4o5p6"]  # no writer recorded
    for folder in (stale, *kept):
        (folder / "variables").mkdir(parents=True)
    written = []
    path = publish.export(untrained_module, tmp_path, "m", before_rename=written.append)
    assert path == model_dir / "1" and (path / "saved_model.pb").is_file()
    assert not stale.exists() and all(folder.exists() for folder in kept)
    # this export's own folder named its writer, for the next export to judge
    assert written[0].name.startswith(f"{publish.TEMP_PREFIX}{os.getpid()}-{host}-")
    # a complete SavedModel in a temporary folder is no version to any reader
    shutil.copytree(path, kept[0], dirs_exist_ok=True)
    assert _tf_serving_versions(model_dir) == [1]
    assert deployed.version_dir(str(model_dir)) == path
    assert publish.next_version(model_dir) == 2
