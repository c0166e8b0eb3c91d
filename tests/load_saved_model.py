"""Subprocess helper: load a SavedModel with plain TensorFlow and answer every signature.

    python tests/load_saved_model.py MODEL_DIR INPUTS.npz OUT.npz
"""

import sys

import numpy as np
import tensorflow as tf

model_dir, inputs_path, out_path = sys.argv[1:4]
loaded = tf.saved_model.load(model_dir)
inputs = np.load(inputs_path, allow_pickle=True)  # our own file: PNG bytes as objects
results = {}
for name in ("serving_default", "classify_raw", "classify_encoded"):
    images = tf.constant(inputs[name])
    # each signature, and the restored tf.function of the same name (the faster call)
    for prefix, outputs in ((name, loaded.signatures[name](images=images)),
                            (f"function_{name}", getattr(loaded, name)(images))):
        # strings (the reason) as fixed-width bytes: np.load refuses object arrays
        results.update({f"{prefix}/{k}": v.numpy().astype(bytes) if v.dtype == tf.string
                        else v.numpy() for k, v in outputs.items()})
forbidden = [m for m in ("sdim_tf", "tensorflow_probability", "pipeline") if m in sys.modules]
assert not forbidden, f"imported {forbidden}"
np.savez(out_path, **results)
