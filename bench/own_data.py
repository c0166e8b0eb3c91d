"""Your own images, end to end: small sets of `bench.own_datasets` through
`python -m pipeline.run --dataset=image_folder --data_dir=DIR`, nothing else but the run
and export folders, beside the discriminative baseline on the same encoder
(`--model=discriminative`).

The target per set: an exported model whose deployed rule rejects at most twice its budget of
the set's own test images, with test accuracy within 3 points of the baseline's; or a
one-line refusal (`error: ...`, exit code 1).

    python -m bench.own_data --sets=textures,shapes --work=/tmp/own_data

`--equal_size=32` (the default) first brings every image of a set to one size and one
colour mode (grey or RGB, what most of its images are), for an ingest that takes one size;
0 gives the sets as made. Writes bench/results/<machine kind>/own_data.json.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

from bench import machine, own_datasets
from pipeline import artifacts
from pipeline.run_dir import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("sdim", "discriminative")
REJECTED_OVER_BUDGET_MAX = 2.0  # rejected test images / budget
ACCURACY_GAP_MAX = 0.03  # below the discriminative baseline


def equal_size(source: pathlib.Path, target: pathlib.Path, side: int) -> str:
    """Every image file under `source` as a side x side PNG under `target` (same relative
    path), in the colour mode most of them have ("L" or "RGB"); returns that mode."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    opened = {p: Image.open(p) for p in files}
    modes = collections.Counter("L" if image.mode in ("L", "LA", "I", "I;16") else "RGB"
                                for image in opened.values())
    mode = modes.most_common(1)[0][0]
    for path, image in opened.items():
        if image.mode.startswith("I"):  # 16-bit grey: to 8 bits
            image = Image.fromarray((np.asarray(image, np.uint32) // 257).astype(np.uint8))
        out = target / path.relative_to(source).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        image.convert(mode).resize((side, side), Image.BILINEAR).save(out)
    return mode


def pipeline(data_dir: pathlib.Path, run_dir: pathlib.Path, export_dir: pathlib.Path,
             extra: list[str]) -> dict:
    """One `pipeline.run` process: exit code, its last stderr line, wall time."""
    command = [sys.executable, "-m", "pipeline.run", "--dataset=image_folder",
               f"--data_dir={data_dir}", f"--run_dir={run_dir}", f"--export_dir={export_dir}",
               *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    start = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    return {"command": " ".join(["python -m pipeline.run", *command[3:]]),
            "exit_code": done.returncode, "seconds": round(time.time() - start, 1),
            "last_line": lines[-1] if lines else "",
            "traceback": "Traceback (most recent call last)" in done.stderr}


def figures(run_dir: pathlib.Path) -> dict:
    """What the run's stages measured: test accuracy and rejection of the deployed rule, the
    promise, the covariance the density took, and what export did."""
    view, found = Run(run_dir), {}
    if view.evaluation.exists():
        report = view.evaluation.report()
        key = report["deployed_percentile"]
        found.update(test_images=report["num_test"], accuracy=report["accuracy"],
                     rejected=report["selective"][key]["reject_rate"],
                     accuracy_on_accepted=report["selective"][key]["accuracy_left"])
    if view.calibration.exists():
        saved = view.calibration.saved
        deployed = saved["deployed"]
        found.update(held_out=saved["examples"]["num_samples"],
                     budget=deployed.get("alpha"), confidence=deployed.get("confidence"),
                     promise=deployed.get("guarantee"),
                     covariance={layer: {k: record[k] for k in ("covariance", "shrinkage")}
                                 for layer, record in ((saved.get("density_fit") or {})
                                                       .get("covariance") or {}).items()})
    if view.export.exists():
        record = view.export.record()
        card = json.loads((pathlib.Path(record["path"]) / "assets" /
                           "model_card.json").read_text())
        found.update(exported=record["path"], gate=card["gate"])
    return found


def verdict(sdim: dict, baseline: dict) -> dict:
    """Whether a set meets the target (module docstring), and why not."""
    run, seen = sdim["run"], sdim["figures"]
    if run["exit_code"] != 0:
        one_line = run["last_line"].startswith("error: ") and not run["traceback"]
        return {"outcome": "refused", "ok": one_line,
                "why": run["last_line"] if one_line else "not a one-line refusal"}
    budget = seen["gate"]["budget"]
    rejected_ok = seen["rejected"] <= REJECTED_OVER_BUDGET_MAX * budget
    gap = baseline["figures"].get("accuracy", 0.0) - seen["accuracy"]
    why = []
    if not rejected_ok:
        why.append(f"rejects {seen['rejected']:.3f} > {REJECTED_OVER_BUDGET_MAX} x {budget:.3f}")
    if gap > ACCURACY_GAP_MAX:
        why.append(f"accuracy {seen['accuracy']:.3f} is {gap:.3f} below the baseline's")
    return {"outcome": "exported", "ok": not why, "why": "; ".join(why),
            "rejected_over_budget": round(seen["rejected"] / budget, 3),
            "accuracy_minus_baseline": round(-gap, 4)}


FLAGS = flags.FLAGS
flags.DEFINE_list("sets", ["textures", "shapes"], f"Sets among {', '.join(own_datasets.SETS)}.")
flags.DEFINE_string("work", "/tmp/own_data", "Folder for the sets, runs and exports.")
flags.DEFINE_integer("per_class", None, "Training images per class (default per set).")
flags.DEFINE_integer("equal_size", 32, "Side every image is brought to (0: as made).")
flags.DEFINE_integer("seed", 0, "Seed of the sets.")
flags.DEFINE_string("out", None, "Results folder (default bench/results).")


def main(argv):
    del argv
    work = pathlib.Path(FLAGS.work)
    record = {"benchmark": "own_data", "machine": machine.machine(),
              "command": " ".join(["python -m bench.own_data", *sys.argv[1:]]),
              "target": {"rejected_over_budget_max": REJECTED_OVER_BUDGET_MAX,
                         "accuracy_gap_max": ACCURACY_GAP_MAX},
              "versions": artifacts.package_versions(), "sets": {}}
    for name in FLAGS.sets:
        kwargs = {"per_class": FLAGS.per_class} if FLAGS.per_class else {}
        folder = own_datasets.SETS[name](work / "sets" / name, seed=FLAGS.seed, **kwargs)
        mode = None
        if FLAGS.equal_size:
            mode = equal_size(folder, work / "equal" / name, FLAGS.equal_size)
            folder = work / "equal" / name
        counts = {split: sum(1 for p in (folder / split).rglob("*") if p.is_file())
                  for split in ("train", "test")}
        runs = {}
        for model in MODELS:
            run_dir = work / "runs" / f"{name}-{model}"
            extra = [] if model == "sdim" else ["--model=discriminative"]
            runs[model] = {"run": pipeline(folder, run_dir, work / "models", extra)}
            runs[model]["figures"] = figures(run_dir)
            print(name, model, runs[model]["run"]["exit_code"], runs[model]["run"]["seconds"],
                  "s", runs[model]["figures"].get("accuracy"),
                  runs[model]["figures"].get("rejected"), flush=True)
        record["sets"][name] = {"images": counts, "equal_size": FLAGS.equal_size or None,
                                "mode": mode, **runs,
                                "verdict": verdict(runs["sdim"], runs["discriminative"])}
        print(name, record["sets"][name]["verdict"], flush=True)
    out = machine.results_path("own_data", FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
