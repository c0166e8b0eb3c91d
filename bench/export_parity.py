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

from absl import app, flags

from bench import machine
from bench.serving_timing import answers, compare
from sdim_tf import data

FLAGS = flags.FLAGS
flags.DEFINE_list("saved_models", None, "The two SavedModel folders (versions) to compare.")
flags.DEFINE_string("dataset", "fashion_mnist", "Whose test images to classify.")
flags.DEFINE_integer("batch_size", 256, "Images per request (at most the export's max_batch).")
flags.DEFINE_string("out", None, "JSON results (default: "
                    "bench/results/<machine kind>/export_parity.json).")

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
