"""Test accuracy and seconds per epoch of one model on the real data (a measurement, not a test).

python -m bench.train_curve --critic=concat --epochs=10   (SDIM_DATA_DIR must hold the IDX data)
Writes bench/results/train_curve_<model>_<critic>.json after every epoch.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import keras
from absl import app, flags

from pipeline.config import PipelineConfig
from pipeline.run_dir import Examples
from pipeline.stages import ingest, train
from sdim_tf import precision

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fashion_mnist", "Dataset name.")
flags.DEFINE_enum("model", "sdim", ["sdim", "discriminative"], "Model.")
flags.DEFINE_string("critic", "concat", "SDIM critic.")
flags.DEFINE_integer("epochs", 10, "Epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_enum("mixed_precision", "float32", precision.PRECISIONS, "Training compute "
                  "dtype, as pipeline.run's (auto: bfloat16 where the hardware has it natively).")


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    chosen, _ = precision.resolve(FLAGS.mixed_precision, precision.Hardware.detect())
    keras.mixed_precision.set_global_policy(precision.POLICIES[chosen])
    examples = Examples(pathlib.Path(tempfile.mkdtemp()) / FLAGS.dataset)
    ingest.ingest(FLAGS.dataset, examples.folder)
    train_ds = examples.dataset("train", batch_size=FLAGS.batch_size, training=True,
                                seed=FLAGS.seed)
    test = examples.dataset("test")
    config = PipelineConfig.from_flat(dataset=FLAGS.dataset, model=FLAGS.model,
                                      critic=FLAGS.critic, epochs=FLAGS.epochs,
                                      batch_size=FLAGS.batch_size, seed=FLAGS.seed).resolve()
    model = train.build_model(config.model, config.train, examples.num_classes,
                              examples.image_shape[-1],
                              examples.num_examples("train") // FLAGS.batch_size)
    name = f"train_curve_{FLAGS.model}_{FLAGS.critic if FLAGS.model == 'sdim' else 'none'}"
    if chosen != "float32":
        name += f"_{chosen}"
    out = pathlib.Path("bench/results") / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "machine": {"cpus": os.cpu_count(),
              "processor": platform.processor(), "platform": platform.platform()},
              "versions": {"tensorflow": __import__("tensorflow").__version__,
                           "keras": keras.__version__},
              "parameters": model.trainable_parameter_count(), "epochs": []}
    for epoch in range(1, FLAGS.epochs + 1):
        start = time.time()
        history = model.fit(train_ds, epochs=1, verbose=2)
        seconds = time.time() - start
        test_metrics = model.evaluate(test, verbose=0, return_dict=True)
        record["epochs"].append({"epoch": epoch, "seconds": round(seconds, 1),
                                 "train": {k: float(v[-1]) for k, v in history.history.items()},
                                 "test_accuracy": float(test_metrics["accuracy"])})
        out.write_text(json.dumps(record, indent=2))
        print(f"epoch {epoch}: test accuracy {test_metrics['accuracy']:.4f}, {seconds:.0f} s",
              flush=True)


if __name__ == "__main__":
    app.run(main)
