"""What SDIM's training adds: SDIM, the discriminative baseline and the untrained network,
same encoder, data, epochs, deployed score and rule.

python -m bench.ablation --epochs=20 --runs_root=/work/runs/ablation \
    --out=bench/results/ablation_fashion_mnist_e20.json

Runs `python -m pipeline.run --stages=ingest,train,calibrate,evaluate` for SDIM and the
discriminative model at --seeds, and the untrained network (--epochs=0) at the first seed,
one after another; a run that stopped resumes where it was (the runner skips finished
stages, train resumes from its last epoch). Then, per run: the held-out figures of the
deployed rule and the proxy outliers built from held-out images (`sdim_tf.monitoring`, what
the train stage watches), and the evaluate stage's test, MNIST and shift-suite figures
(`bench.run_figures.figures`). The JSON is written after every run.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import keras
from absl import app, flags

from bench import run_figures
from bench.machine import machine
from pipeline import selection
from pipeline.config import PipelineConfig
from pipeline.run_dir import Examples, TrainedModel
from pipeline.stages import train
from sdim_tf import monitoring

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fashion_mnist", "Dataset of every run.")
flags.DEFINE_integer("epochs", 20, "Training epochs of the trained runs.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the trained runs (the untrained: the first).")
flags.DEFINE_list("models", ["sdim", "discriminative", "untrained"], "Which runs.")
flags.DEFINE_string("runs_root", "/tmp/sdim-ablation", "Folder of the run folders (kept: "
                    "a second call resumes or reuses them).")
flags.DEFINE_list("extra_flags", [], "Flags passed to every pipeline run, e.g. "
                  "--extra_flags=--mixed_precision=float32.")
flags.DEFINE_string("out", None, "Where the JSON goes.")


def specs() -> list[tuple[str, list[str]]]:
    """(run name, pipeline flags) of every run asked for, seed by seed (so that a partial
    ablation already compares the models at the first seed)."""
    unknown = set(FLAGS.models) - {"sdim", "discriminative", "untrained"}
    if unknown:
        raise ValueError(f"--models: unknown {sorted(unknown)}; known: sdim, discriminative, "
                         "untrained")
    out = []
    for i, seed in enumerate(FLAGS.seeds):
        for model in FLAGS.models:
            if model != "untrained":
                out.append((f"{model}-e{FLAGS.epochs}-s{seed}",
                            [f"--model={model}", f"--epochs={FLAGS.epochs}", f"--seed={seed}"]))
            elif i == 0:
                out.append((f"untrained-s{seed}", ["--model=sdim", "--epochs=0",
                                                   f"--seed={seed}"]))
    return out


def held_out_figures(run_dir: pathlib.Path) -> dict:
    """The deployed rule on held-out images and the proxy outliers, for the run's best
    checkpoint (what the train stage's monitor records after each epoch). The outliers are
    built with the first seed for every run, so that all runs face the same images."""
    training = PipelineConfig.from_flat(dataset=FLAGS.dataset,
                                        seed=int(FLAGS.seeds[0])).resolve().train
    examples = Examples(run_dir / "ingest")
    selections = selection.split_examples(training, examples.num_examples("train"),
                                          lambda: examples.labels("train"))
    model = keras.models.load_model(run_dir / "train" / TrainedModel.BEST, compile=False)
    quality = monitoring.rejection_quality(model, **train.monitor_data(training, examples,
                                                                          *selections))
    keras.backend.clear_session()
    return {k: round(v, 6) for k, v in monitoring.flat(quality).items() if k != "seconds"}


def main(argv):
    del argv
    root = pathlib.Path(FLAGS.runs_root)
    try:
        planned = specs()
    except ValueError as e:
        sys.exit(f"error: {e}")
    record = {"command": " ".join(["python -m bench.ablation", *sys.argv[1:]]),
              "machine": machine(), "dataset": FLAGS.dataset, "runs": {}}
    for name, run_flags in planned:
        run_dir = root / name
        command = [sys.executable, "-m", "pipeline.run", f"--dataset={FLAGS.dataset}",
                   *run_flags, *FLAGS.extra_flags,
                   "--stages=ingest,train,calibrate,evaluate", f"--run_dir={run_dir}"]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        started = time.time()
        subprocess.run(command, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        record["runs"][name] = {"command": " ".join(command[1:]),
                                "seconds": round(time.time() - started, 1),
                                **run_figures.figures(run_dir),
                                "held_out": held_out_figures(run_dir)}
        if FLAGS.out:
            out = pathlib.Path(FLAGS.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["runs"], indent=1))


if __name__ == "__main__":
    app.run(main)
