"""Known TensorFlow and loading hazards, each a test: TensorProtos whose declared
shape is huge or disagrees with their content (the class of CVE-2021-41197), parsed in a
process of its own so that an abort fails the test; checkpoints and arrays carrying code."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import sdim_tf
from pipeline.run_dir import ArtifactError, Calibration, load_checkpoint
from sdim_tf import scores

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (tf.io.parse_tensor, tf.make_ndarray): how each begins (bench/fuzz_signatures.py
# hazard_protos builds the protos). parse_tensor is TF Serving's Tensor::FromProto.
EXPECTED = {
    "content_shorter_than_shape": ("InvalidArgumentError", "ValueError: cannot reshape"),
    "batch_dim_2e40": ("InvalidArgumentError", "ValueError: cannot reshape"),
    "dims_overflow_int64": ("InvalidArgumentError", "ValueError: cannot reshape"),
    # numpy reads a negative dimension as "infer it": make_ndarray returns [1, 32, 32, 1]
    "negative_dim": ("InvalidArgumentError", "ok [1, 32, 32, 1]"),
    "rank_255": ("InvalidArgumentError", "ValueError: maximum supported dimension"),
    "unknown_rank_with_content": ("ok [1, 32, 32, 1]", "ok [1, 32, 32, 1]"),
    "content_not_whole_elements": ("InvalidArgumentError", "ValueError: buffer size"),
    "dtype_double_sent_as_float": ("InvalidArgumentError: {{function_node", "ok [1, 32, 32, 1]"),
    # one value and a declared shape of 1 TiB: the allocators refuse, nothing is filled
    "one_value_declared_1tib": ("InvalidArgumentError", "MemoryError: Unable to allocate"),
    # 27 bytes become 16 MiB: both fill the declared shape with the one value
    "one_value_declared_4096_images": ("ok [4096, 32, 32, 1]", "ok [4096, 32, 32, 1]"),
    "one_string_declared_2e40": ("InvalidArgumentError", "MemoryError"),
    "three_strings_declared_5": ("ok [5]", "ok [5]"),
    "valid_nan_image": ("ok [1, 32, 32, 1]", "ok [1, 32, 32, 1]"),
}


@pytest.fixture(scope="module")
def hazards():
    """The hazards run in a TensorFlow-only process (no model needed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "bench.fuzz_signatures", "--hazards"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"))
    # negative: killed by a signal (a CHECK failure aborts the process)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["tensor_proto_hazards"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tensor_proto_with_a_lying_shape_is_refused_or_parsed_never_aborts(hazards, name):
    parsed, made = EXPECTED[name]
    assert hazards[name]["parse_tensor"].startswith(parsed), hazards[name]
    assert hazards[name]["make_ndarray"].startswith(made), hazards[name]


def test_every_hazard_is_checked(hazards):
    assert set(hazards) == set(EXPECTED)
    assert hazards["one_value_declared_4096_images"]["proto_bytes"] < 32


def test_a_keras_file_whose_lambda_would_run_code_is_refused(tmp_path):
    """The Lambda's function, if it ran, would create `marker`: safe mode (what
    load_checkpoint uses) refuses the file and runs nothing; without it, the code runs."""
    marker = tmp_path / "ran"
    inputs = keras.Input((3,))
    # the path as a constant of the code (Keras mis-serializes a lambda's defaults)
    touch = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # noqa: S307
    outputs = keras.layers.Lambda(touch)(inputs)
    path = tmp_path / "carrier.keras"
    keras.Model(inputs, outputs).save(path)
    marker.unlink()  # built once by the call above
    with pytest.raises(ArtifactError) as refused:
        load_checkpoint(path)
    assert "carrier.keras cannot be loaded" in str(refused.value)
    assert "Lambda" in str(refused.value) and "safe_mode" in str(refused.value)
    assert not marker.exists()
    keras.models.load_model(path, safe_mode=False)  # the control: without safe mode it runs
    assert marker.exists()


class _Payload:
    """Unpickling it touches `marker`."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_density_file_carrying_a_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "calibrate"
    folder.mkdir()
    (folder / Calibration.THRESHOLDS).write_text(json.dumps({
        "score": "feature_density", "score_settings": {"layers": ["z"], "split": False},
        "class_names": ["a", "b", "c"], "deployed": {"percentile": "1"},
        "percentiles": {"1": {"thresholds": [0.0, 0.0, 0.0], "counts": [1, 1, 1]}}}))
    density_file = folder / scores.FeatureDensityScore.FILE
    np.savez(density_file, **{
        "z/means": np.array([_Payload(marker)], dtype=object),
        "z/precision_factor": np.eye(4)})
    with pytest.raises(ArtifactError, match="density.npz cannot be read.*allow_pickle=False"):
        Calibration(folder).scoring_model(sdim_tf.SDIM(3, (32, 32, 1), rep_dim=4))
    assert not marker.exists()
    with np.load(density_file, allow_pickle=True) as unsafe:
        unsafe["z/means"]  # noqa: B018 - the control: loading with pickle runs the payload
    assert marker.exists()


def _calls(attribute: str) -> list[tuple[str, ast.Call]]:
    """(file:line, call) of every call of `<anything>.<attribute>` in sdim_tf and pipeline."""
    found = []
    for package in ("sdim_tf", "pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == attribute):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return found


def _keyword(call: ast.Call, name: str):
    """The literal value of keyword `name` (absent: the library default)."""
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "?"
    return "default"


def test_no_artifact_loader_allows_pickle_or_unsafe_keras():
    """numpy's default is allow_pickle=False and Keras' safe_mode=True: none may say
    otherwise (or anything not a literal)."""
    loads = _calls("load")
    assert any(where.startswith("pipeline/run_dir.py") for where, _ in loads)
    for where, call in loads:
        if isinstance(call.func.value, ast.Name) and call.func.value.id in ("np", "numpy"):
            assert _keyword(call, "allow_pickle") in (False, "default"), where
    models = _calls("load_model")
    assert models
    for where, call in models:
        assert _keyword(call, "safe_mode") in (True, "default"), where
