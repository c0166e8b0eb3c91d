"""Classify image files with an exported model and show what it refused and why.

    python -m pipeline.predict --model_dir=runs/fashion_mnist-sdim/saved_models/fashion_mnist \
        [--version=N] [--out=predictions] [--driver=local|beam] PATH ...

PATH: image files, folders (searched recursively) or globs. Every file goes to the model as
its bytes, through `classify_encoded`: decoding, channel conversion and resizing are the
model's own graph, so the answers are the ones a server gives. The local driver sends the
requests one after the other in this process; `--driver=beam` runs them as an Apache Beam
pipeline (`pipeline.predict_beam`, RunInference; `--beam_pipeline_args`) with the same
answers (a score to float rounding: it depends on the other files of its request). Writes
to --out:

- `predictions.csv`: path, class_name, score, threshold, margin (score - threshold),
  rejected, reason; one row per classified file, in sorted path order;
- `errors.csv`: path, reason; the files that got no class: unreadable, not PNG/JPEG, over
  the model's limits, or failing to decode;
- `predictions.md` with contact sheets: the rejected images and the accepted ones closest
  to the threshold, each beside a saliency map (|d score / d pixel| of `serving_default`'s
  score, through the loaded SavedModel, on the images `preprocess_encoded` gives).

Class names, limits and the guarantee come from the model's assets. Exit code 1 only for a
usage error or when no file could be classified.
"""

from __future__ import annotations

# First: as the program, it imports TensorFlow without TensorFlow's start-up lines.
from pipeline import console

# isort: split
import csv
import dataclasses
import glob
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import app, flags

from pipeline import classify
from pipeline.classify import Prediction
from pipeline.deployed import DeployedModelError, asset, version_dir

FLAGS = flags.FLAGS
DRIVERS = ("local", "beam")


def define_flags(flag_values=flags.FLAGS) -> None:
    """Defined when run as a program only: pipeline.run's flags share the global registry
    (--beam_pipeline_args) when both modules are imported in one process."""
    flags.DEFINE_string("model_dir", None, "Folder of numbered SavedModel versions, or one "
                        "version.", flag_values=flag_values)
    flags.DEFINE_integer("version", None, "Version to load (default: the newest).",
                         flag_values=flag_values)
    flags.DEFINE_string("out", "predictions", "Folder for predictions.csv, errors.csv and "
                        "the report (created; files of an earlier run there are replaced).",
                        flag_values=flag_values)
    flags.DEFINE_integer("request_files", 64, "Files per request (at most the model's "
                         "max_batch).", flag_values=flag_values)
    flags.DEFINE_integer("report_images", 24, "Images per contact sheet of the report.",
                         flag_values=flag_values)
    flags.DEFINE_enum("driver", "local", list(DRIVERS), "local: the requests one after the other "
                      "in this process; beam: an Apache Beam pipeline, RunInference on the "
                      "batches (pip install sdim-tf[beam]).", flag_values=flag_values)
    flags.DEFINE_list("beam_pipeline_args", [], "With --driver=beam: options of the Beam "
                      "pipeline (--runner=..., --direct_num_workers=...); default the "
                      "in-process DirectRunner.", flag_values=flag_values)
    console.define_flags(flag_values=flag_values)


PREDICTION_COLUMNS = ("path", "class_name", "score", "threshold", "margin", "rejected", "reason")
ERROR_COLUMNS = ("path", "reason")


def image_files(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(files, [(argument, "not_found")]): folders recursively (hidden entries skipped),
    globs expanded, duplicates removed, sorted."""
    files, missing = set(), []
    for argument in paths:
        matches = [argument] if os.path.exists(argument) else sorted(
            glob.glob(argument, recursive=True))
        if not matches:
            missing.append((argument, "not_found"))
        for match in matches:
            if os.path.isdir(match):
                for root, folders, names in os.walk(match):
                    folders[:] = [f for f in folders if not f.startswith(".")]
                    files.update(os.path.join(root, n) for n in names if not n.startswith("."))
            else:
                files.add(match)
    return sorted(files), missing


class Predictor:
    """The loaded SavedModel's signatures, batched within its limits."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.card = asset(path, "model_card.json")
        self.thresholds = asset(path, "thresholds.json")
        self.class_names = self.card["class_names"]
        self.limits = self.card["limits"]
        self.loaded = tf.saved_model.load(str(path))
        missing = {"classify_encoded", "serving_default"} - set(self.loaded.signatures)
        if missing:
            raise DeployedModelError(f"{path}: the SavedModel lacks the signatures "
                                     f"{sorted(missing)}")

    def classify(self, paths: list[str], contents: list[bytes]):
        """-> ([Prediction], [(path, reason)]) of one request (see `classify.classify`)."""
        return classify.split(classify.classify(self.loaded, self.class_names, paths,
                                                contents))

    def preprocess(self, contents: list[bytes]) -> np.ndarray:
        """The float images [N, 32, 32, C] the model classifies for these encoded bytes."""
        return self.loaded.signatures["preprocess_encoded"](
            images=tf.constant(contents, tf.string))["images"].numpy()

    def score_gradients(self, images: np.ndarray) -> np.ndarray:
        """d score / d images of serving_default's `score` (the predicted class's)."""
        images = tf.constant(images, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(images)
            score = self.loaded.signatures["serving_default"](images=images)["score"]
        return tape.gradient(score, images).numpy()

    def saliency(self, contents: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(the images the model saw, |d score / d image| max over channels, scaled to
        [0, 1] per image)."""
        images = self.preprocess(contents)
        grads = np.abs(self.score_gradients(images)).max(-1)
        scale = np.maximum(grads.reshape(len(grads), -1).max(1), 1e-12)[:, None, None]
        return images, grads / scale


def batches(files: list[str], batch_size: int, max_request_bytes: int, max_image_bytes: int):
    """Yields (paths, contents, errors): files read in order, each request within the
    model's batch and byte limits; unreadable or oversize files go to errors unread."""
    paths, contents, size, errors = [], [], 0, []
    for path in files:
        content, reason = classify.read(path, max_image_bytes)
        if content is None:
            errors.append((path, reason))
            continue
        if paths and (len(paths) == batch_size or size + len(content) > max_request_bytes):
            yield paths, contents, errors
            paths, contents, size, errors = [], [], 0, []
        paths.append(path)
        contents.append(content)
        size += len(content)
    if paths or errors:
        yield paths, contents, errors


def predict(predictor: Predictor, files: list[str], batch_size: int = 64,
            progress: bool = True) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """The local driver: requests one after the other in this process."""
    limits = classify.RequestLimits.of(predictor.limits, batch_size)
    predictions, errors = [], []
    done = 0
    with console.Progress("predict", len(files), "file", every=30, shown=progress) as bar:
        for paths, contents, unread in batches(files, **dataclasses.asdict(limits)):
            errors += unread
            if paths:
                p, e = predictor.classify(paths, contents)
                predictions += p
                errors += e
            done += len(paths) + len(unread)
            bar.update(done)
    return sorted(predictions, key=lambda p: p.path), sorted(errors)


def _write_csv(path: pathlib.Path, columns, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _sheet(predictor: Predictor, chosen: list[Prediction], path: pathlib.Path) -> list[str]:
    """A contact sheet of `chosen` with saliency maps; returns the report's table rows."""
    from sdim_tf import plots

    contents = [pathlib.Path(p.path).read_bytes() for p in chosen]
    images, maps = predictor.saliency(contents)
    captions = [f"#{i + 1} {p.class_name}\n{p.score:.3g} vs {p.threshold:.3g}"
                for i, p in enumerate(chosen)]
    plots.contact_sheet(images, maps, captions, path)
    return [f"| {i + 1} | `{p.path}` | {p.class_name} | {p.score:.4g} | {p.threshold:.4g} | "
            f"{p.margin:+.4g} | {p.reason or 'accepted'} |" for i, p in enumerate(chosen)]


def report(predictor: Predictor, predictions: list[Prediction], errors: list, out: pathlib.Path,
           per_sheet: int) -> str:
    """predictions.md (and its PNGs in `out`)."""
    rejected = sorted((p for p in predictions if p.rejected), key=lambda p: p.margin)
    accepted = sorted((p for p in predictions if not p.rejected), key=lambda p: p.margin)
    deployed = predictor.thresholds.get("deployed", {})
    lines = [
        "# Predictions", "",
        f"Model `{predictor.path}` ({predictor.card.get('model_name', '')}); classes: "
        f"{', '.join(predictor.class_names)}.", "",
        f"Rejection: {predictor.card['rejection']['score']}; "
        f"{deployed.get('guarantee') or deployed.get('rule', '')}.", "",
        f"- files: {len(predictions) + len(errors)}",
        f"- classified: {len(predictions)} ({len(accepted)} accepted, {len(rejected)} rejected)",
        f"- not classified: {len(errors)} (errors.csv)", ""]
    header = ["| # | path | class | score | threshold | margin | reason |",
              "|---|---|---|---|---|---|---|"]
    for title, chosen, name in (
            ("Rejected (lowest margin first)", rejected, "rejected.png"),
            ("Accepted, closest to the threshold", accepted, "accepted_near_threshold.png")):
        lines += [f"## {title}: {min(len(chosen), per_sheet)} of {len(chosen)}", ""]
        if chosen and per_sheet:  # --report_images=0: counts only
            rows = _sheet(predictor, chosen[:per_sheet], out / name)
            lines += [f"![{title}]({name})", "", "Each image as the model saw it (32x32), "
                      "then the saliency of its score laid over it.", "", *header, *rows, ""]
    if errors:
        counts: dict[str, int] = {}
        for _, reason in errors:
            code = reason.split(":")[0]
            counts[code] = counts.get(code, 0) + 1
        lines += ["## Not classified", "", "| reason | files |", "|---|---|",
                  *[f"| {code} | {n} |" for code, n in sorted(counts.items())], ""]
    return "\n".join(lines)


def write(predictor: Predictor, predictions: list[Prediction], errors: list, out: pathlib.Path,
          per_sheet: int) -> None:
    """All outputs built in a temporary folder, then moved into `out` file by file."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".predict-tmp-", dir=out))
    try:
        _write_csv(tmp / "predictions.csv", PREDICTION_COLUMNS, [p.row() for p in predictions])
        _write_csv(tmp / "errors.csv", ERROR_COLUMNS,
                   [{"path": p, "reason": r} for p, r in errors])
        (tmp / "predictions.md").write_text(report(predictor, predictions, errors, tmp,
                                                   per_sheet) + "\n")
        for stale in ("rejected.png", "accepted_near_threshold.png"):
            (out / stale).unlink(missing_ok=True)
        for file in tmp.iterdir():
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _predict_beam(predictor: Predictor, files: list[str], out: pathlib.Path):
    """The beam driver, with its errors as one line."""
    try:
        from pipeline import predict_beam  # apache_beam: an optional dependency
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("apache_beam"):
            raise
        sys.exit("error: --driver=beam needs Apache Beam: pip install sdim-tf[beam]")
    try:
        return predict_beam.predict(
            predictor.path, predictor.class_names,
            classify.RequestLimits.of(predictor.limits, FLAGS.request_files), files,
            FLAGS.beam_pipeline_args, out)
    except predict_beam.BeamOptionsError as e:
        sys.exit(f"error: {e}")


def main(argv):
    console.setup(FLAGS.verbose)
    if not FLAGS.model_dir:
        sys.exit("error: --model_dir is required (a folder of SavedModel versions)")
    if len(argv) < 2:
        sys.exit("error: give at least one image file, folder or glob")
    if FLAGS.request_files < 1 or FLAGS.report_images < 0:
        sys.exit("error: --request_files must be >= 1 and --report_images >= 0")
    if FLAGS.beam_pipeline_args and FLAGS.driver != "beam":
        sys.exit("error: --beam_pipeline_args needs --driver=beam")
    try:
        path = version_dir(FLAGS.model_dir, FLAGS.version)
        predictor = Predictor(path)
    except DeployedModelError as e:
        sys.exit(f"error: {e}")
    files, missing = image_files(argv[1:])
    out = pathlib.Path(FLAGS.out)
    if FLAGS.driver == "beam":
        predictions, errors = _predict_beam(predictor, files, out)
    else:
        predictions, errors = predict(predictor, files, FLAGS.request_files)
    errors = sorted(errors + missing)
    write(predictor, predictions, errors, out, FLAGS.report_images)
    rejected = sum(p.rejected for p in predictions)
    print(f"{path}: {len(predictions)} classified ({len(predictions) - rejected} accepted, "
          f"{rejected} rejected), {len(errors)} not classified; wrote {out}/predictions.csv, "
          "errors.csv, predictions.md")
    if not predictions:
        sys.exit(f"error: no file could be classified ({len(errors)} listed in "
                 f"{out}/errors.csv)")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
