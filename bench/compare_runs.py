"""The deployed figures of finished pipeline runs side by side; the bf16 parity check.

python -m bench.compare_runs --parity=bf16 \
    --runs=bf16=runs/parity-bf16-s0,fp32_s0=runs/parity-fp32-s0,fp32_s1=runs/parity-fp32-s1 \
    --out=bench/results/avx512_bf16/parity_fashion_mnist_e10.json

Each run's figures come from its own artifacts (evaluate/report.json, train/state.json): test
accuracy, the deployed rule's test rejection, the share of MNIST it rejects and the AUROC,
the shift suite's silent errors, and when the attack stage ran (attack/attack_report.json)
the undetected success of the adaptive attacks per model and budget and Carlini et al.'s
checks. With --parity=NAME, NAME's figures must lie within the
spread of the other runs widened by --parity_margin points (bf16 costs no quality).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

from bench.machine import machine
from bench.run_figures import figures, parity

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "name=run_dir pairs of finished runs (train, calibrate, "
                  "evaluate).")
flags.DEFINE_string("parity", None, "The run whose figures must lie within the others' "
                    "spread widened by --parity_margin.")
flags.DEFINE_float("parity_margin", 0.3, "Percentage points (AUROC x 100) added to the spread.")
flags.DEFINE_string("out", None, "Where the JSON goes (default: print only).")

def main(argv):
    del argv
    if not FLAGS.runs:
        sys.exit("error: --runs=name=run_dir,... is required")
    runs = {}
    for pair in FLAGS.runs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            sys.exit(f"error: --runs: expected name=run_dir, got {pair!r}")
        runs[name] = path
    try:
        by_run = {name: figures(path) for name, path in runs.items()}
        record = {"command": " ".join(["python -m bench.compare_runs", *sys.argv[1:]]),
                  "machine": machine(), "runs": runs, "figures": by_run}
        if FLAGS.parity:
            record["parity"] = parity(by_run, FLAGS.parity, FLAGS.parity_margin)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    keys = list(dict.fromkeys(k for f in by_run.values() for k in f))
    print("| figure | " + " | ".join(by_run) + " |")
    print("|---|" + "---|" * len(by_run))
    for key in keys:
        print(f"| {key} | " + " | ".join(str(f.get(key, "—")) for f in by_run.values()) + " |")
    if "parity" in record:
        print(json.dumps(record["parity"], indent=1))
    if FLAGS.out:
        out = pathlib.Path(FLAGS.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
