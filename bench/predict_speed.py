"""Throughput of `pipeline.predict` on a folder of real test images written as PNG files.

    python -m bench.predict_speed \
        --model_dir=runs/fashion_mnist-sdim/saved_models/fashion_mnist [--files=10000]

Times, in one process: loading the SavedModel, classifying the files (reading, batching,
`classify_encoded`), and writing the CSVs and the report (contact sheets with saliency).
Writes bench/results/<machine kind>/predict_speed.json.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from bench import machine
from pipeline import deployed, predict
from sdim_tf import data

flags.DEFINE_string("model_dir", None, "Folder of SavedModel versions (the newest is used).")
flags.DEFINE_integer("files", 10000, "PNG files to classify (test images, repeated if needed).")
flags.DEFINE_string("dataset", "fashion_mnist", "Whose test images to write.")
flags.DEFINE_string("out", None, "JSON results (default: "
                    "bench/results/<machine kind>/predict_speed.json).")
FLAGS = flags.FLAGS


def main(argv):
    images, _ = data.load_split(FLAGS.dataset, "test")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "images"
        folder.mkdir()
        for i in range(FLAGS.files):
            (folder / f"{i:06d}.png").write_bytes(
                tf.io.encode_png(images[i % len(images)]).numpy())
        started = time.perf_counter()
        predictor = predict.Predictor(deployed.version_dir(FLAGS.model_dir))
        loaded = time.perf_counter()
        files, _ = predict.image_files([str(folder)])
        predictions, errors = predict.predict(predictor, files, progress=False)
        classified = time.perf_counter()
        predict.write(predictor, predictions, errors, pathlib.Path(tmp) / "out", 24)
        written = time.perf_counter()
    figures = {
        "machine": machine.machine(), "model": str(predictor.path), "files": len(files),
        "classified": len(predictions), "errors": len(errors),
        "rejected_share": round(float(np.mean([p.rejected for p in predictions])), 4),
        "load_seconds": round(loaded - started, 2),
        "classify_seconds": round(classified - loaded, 2),
        "files_per_second": round(len(files) / (classified - loaded), 1),
        "report_seconds": round(written - classified, 2),
    }
    out = pathlib.Path(FLAGS.out) if FLAGS.out else machine.results_path("predict_speed")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    app.run(main)
