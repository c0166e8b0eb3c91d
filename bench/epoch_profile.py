"""Where a training epoch's time goes, from a run's history.csv (the train stage profiles
every epoch): the steps against their own median step, the per-epoch test accuracy, the
rejection monitor and the checkpoints.

    python -m bench.epoch_profile --run_dir=runs/fashion_mnist-sdim

Targets (speed on whatever machine): epoch <= 1.10 x steps x median step; test
accuracy and monitoring together <= 5% of the epoch. Writes
bench/results/<machine kind>/epoch_profile_<run name>.json.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags

from bench import machine
from pipeline import artifacts, selection
from pipeline.config import PipelineConfig
from pipeline.run_dir import Run

PROFILED = ("train_seconds", "step_ms_median", "test_seconds", "monitor_seconds",
            "checkpoint_seconds", "seconds")


def profile(run_dir: str | pathlib.Path) -> dict:
    """Per profiled epoch and as medians over them: epoch / (steps x median step), and the
    shares of the epoch spent in the steps, the test accuracy, the monitor, the checkpoints
    and elsewhere (input pipeline start, logging, history)."""
    view = Run(run_dir)
    rows = [r for r in view.model.history() if all(k in r for k in PROFILED)]
    steps = rows[-1].get("steps") if rows else None
    steps = steps or _steps(view)
    if not rows or not steps:
        raise ValueError(f"{run_dir}: no profiled epoch in history.csv (runs trained before "
                         "the train stage recorded step times have none)")
    epochs = []
    for r in rows:
        seconds = float(r["seconds"])
        steps_only = steps * float(r["step_ms_median"]) / 1000
        parts = {k: float(r[f"{k}_seconds"]) for k in ("train", "test", "monitor", "checkpoint")}
        epochs.append({
            "epoch": int(r["epoch"]), "seconds": seconds,
            "epoch_over_steps": round(seconds / steps_only, 3),
            "train_over_steps": round(parts["train"] / steps_only, 3),
            "watching_share": round((parts["test"] + parts["monitor"]) / seconds, 4),
            **{f"{k}_share": round(v / seconds, 4) for k, v in parts.items()},
            "other_share": round(1 - sum(parts.values()) / seconds, 4)})
    medians = {k: round(float(np.median([e[k] for e in epochs])), 4)
               for k in epochs[0] if k != "epoch"}
    return {"run_dir": str(view.root), "steps_per_epoch": int(steps), "epochs": epochs,
            "median": medians,
            "targets": {"epoch_over_steps_max": 1.10, "watching_share_max": 0.05}}


def _steps(view: Run) -> int | None:
    """Steps per epoch of a run whose rows predate the `steps` column, from its config."""
    if not (view.model.folder / artifacts.MANIFEST).exists():
        return None
    trained = view.model.manifest()["config"]
    training = PipelineConfig.from_flat(**{k: trained[k] for k in (
        "validation_split", "validation_fraction", "train_limit", "batch_size")
        if k in trained}).train
    trained, _ = selection.split_examples(training, view.examples.num_examples("train"),
                                          lambda: view.examples.labels("train"))
    limit = selection.size(trained)
    return limit // training.batch(limit)


def main(argv):
    del argv
    figures = profile(flags.FLAGS.run_dir)
    record = {"benchmark": "epoch_profile", "machine": machine.machine(),
              "versions": artifacts.package_versions(), "figures": figures}
    out = machine.results_path(f"epoch_profile_{pathlib.Path(flags.FLAGS.run_dir).name}")
    artifacts.write_json(out, record)
    print(figures["median"])
    print(f"wrote {out}")


if __name__ == "__main__":
    flags.DEFINE_string("run_dir", None, "A run directory whose train stage has finished "
                        "epochs.")
    flags.mark_flag_as_required("run_dir")
    app.run(main)
