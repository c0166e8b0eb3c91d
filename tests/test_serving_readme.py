"""The README's TF Serving REST examples, converted as TF Serving does, answered by the model."""

import base64
import json
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from pipeline.run_dir import Run
from sdim_tf import data

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_examples() -> dict:
    text = README.read_text()
    found = re.findall(r"<!-- rest-example: (\w+) -->\s*```json\n(.*?)\n```", text, re.S)
    return {name: json.loads(body) for name, body in found}


def _decode_b64(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def rest_to_tensor(request: dict, dtype) -> tf.Tensor:
    """TF Serving's REST conversion for a signature with one input named `images`."""
    if "instances" in request:  # row format: one entry per example
        rows = [r["images"] if isinstance(r, dict) and "images" in r else r
                for r in request["instances"]]
        values = _decode_b64(rows)
    else:  # columnar format
        inputs = request["inputs"]
        values = _decode_b64(inputs["images"] if isinstance(inputs, dict) else inputs)
    if dtype == tf.string:
        return tf.constant(values, tf.string)
    return tf.constant(np.asarray(values), dtype)


def _fill(example, name, images_uint8):
    """The README shortens its examples; put real images of the right size in them."""
    request = json.loads(json.dumps(example))
    if name == "serving_default":
        request["instances"] = data.preprocess(images_uint8).numpy().tolist()
    elif name == "classify_raw":
        request["inputs"]["images"] = images_uint8.tolist()
    else:
        request["instances"] = [
            {"b64": base64.b64encode(tf.io.encode_png(i).numpy()).decode()}
            for i in images_uint8]
    return request


def test_readme_has_an_example_per_signature():
    assert set(readme_examples()) == {"serving_default", "classify_raw", "classify_encoded"}


@pytest.mark.parametrize("name,dtype", [("serving_default", tf.float32),
                                        ("classify_raw", tf.uint8),
                                        ("classify_encoded", tf.string)])
def test_rest_examples_are_answered(tiny_run, data_dir, name, dtype):
    _, run_dir = tiny_run
    path = Run(run_dir).export.record()["path"]
    loaded = tf.saved_model.load(path)
    example = readme_examples()[name]
    assert example["signature_name"] == name
    images, _ = data.load_split("fashion_mnist", "test", str(data_dir))
    request = _fill(example, name, images[:5])
    outputs = loaded.signatures[name](images=rest_to_tensor(request, dtype))
    reference = loaded.signatures["classify_raw"](images=tf.constant(images[:5]))
    np.testing.assert_allclose(outputs["class_scores"], reference["class_scores"], rtol=1e-5,
                               atol=1e-5 * np.abs(reference["class_scores"].numpy()).max())
    np.testing.assert_array_equal(outputs["class_name"], reference["class_name"])
    assert outputs["rejected"].shape == (5,)
