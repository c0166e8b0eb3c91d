"""Whether two exports of one model answer alike: serving_default of each SavedModel on every
test image of a dataset; `class_ids`, `rejected`, `reason` and `class_name` compared bit for
bit, the float outputs by their largest difference, beside how near the answers lie to
changing (the smallest |score - threshold| and the smallest gap between the two best
classes).

    python -m bench.export_parity --saved_models=BEFORE,AFTER [--dataset=fashion_mnist]

Writes bench/results/<machine kind>/export_parity.json (float results depend on the CPU).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags

from bench import machine
from sdim_tf import data

FLAGS = flags.FLAGS
flags.DEFINE_list("saved_models", None, "The two SavedModel folders (versions) to compare.")
flags.DEFINE_string("dataset", "fashion_mnist", "Whose test images to classify.")
flags.DEFINE_integer("batch_size", 256, "Images per request (at most the export's max_batch).")
flags.DEFINE_string("out", None, "JSON results (default: "
                    "bench/results/<machine kind>/export_parity.json).")

EXACT = ("class_ids", "rejected", "reason", "class_name")
FLOATS = ("class_scores", "score", "threshold", "gap", "probabilities")


def answers(path, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """{output: [N, ...]} of serving_default over `images` in requests of `batch_size`."""
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    parts = [signature(images=tf.constant(images[i:i + batch_size]))
             for i in range(0, len(images), batch_size)]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def compare(before: dict, after: dict) -> dict:
    """The outputs that differ bit for bit, and the float outputs' largest differences."""
    result = {"images": int(len(before["class_ids"]))}
    for key in EXACT:
        differ = (before[key] != after[key]).reshape(len(before[key]), -1).any(1)
        result[f"{key}_differ"] = int(differ.sum())
    for key in FLOATS:
        a, b = before[key].astype(np.float64), after[key].astype(np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        result[f"{key}_nonfinite_differ"] = int((~finite & (a != b)).sum())
        difference = np.abs(a - b)[finite]
        scale = np.maximum(np.abs(a), 1.0)[finite]
        result[f"{key}_max_abs_difference"] = float(difference.max(initial=0.0))
        result[f"{key}_max_difference_over_max(|value|,1)"] = float(
            (difference / scale).max(initial=0.0))
    margin = np.abs(before["score"].astype(np.float64) - before["threshold"])
    result["smallest_abs_score_minus_threshold"] = float(
        margin[np.isfinite(margin)].min(initial=np.inf))
    gap = before["gap"][np.isfinite(before["gap"])]
    result["smallest_gap"] = float(gap.min()) if gap.size else None
    result["bitwise_identical_decisions"] = all(result[f"{k}_differ"] == 0 for k in EXACT)
    return result


def main(argv):
    del argv
    if not FLAGS.saved_models or len(FLAGS.saved_models) != 2:
        raise SystemExit("error: --saved_models takes two SavedModel folders: BEFORE,AFTER")
    raw, _ = data.load_split(FLAGS.dataset, "test")
    images = data.preprocess(raw).numpy()
    before, after = (answers(path, images, FLAGS.batch_size) for path in FLAGS.saved_models)
    record = {"command": " ".join(["python -m bench.export_parity", *sys.argv[1:]]),
              "machine": machine.machine(), "dataset": FLAGS.dataset,
              "saved_models": list(FLAGS.saved_models), **compare(before, after)}
    out = pathlib.Path(FLAGS.out) if FLAGS.out else machine.results_path("export_parity")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    app.run(main)
