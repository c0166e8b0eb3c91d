"""The Apache Beam driver of `pipeline.predict` (`pip install sdim-tf[beam]`): the answers of
the local driver, from RunInference.

The files are read on Beam's workers, batched by `beam.BatchElements` within the request
limits of the local driver (`classify.RequestLimits`) and classified by RunInference with
`EncodedImagesHandler`, which loads the SavedModel once per worker. The runner is the
in-process DirectRunner by default, or the one `pipeline_args` names: the workers of a
distributed runner must see the files, the model and the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import apache_beam as beam
import tensorflow as tf
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from pipeline import classify
from sdim_tf.data.beam import BeamOptionsError as BeamOptionsError  # predict catches it
from sdim_tf.data.beam import make_pipeline

_UNREAD = "unread"


def _content_bytes(element: tuple[str, bytes]) -> int:
    return len(element[1])


class EncodedImagesHandler(ModelHandler):
    """(path, PNG/JPEG bytes) -> PredictionResult(path, classify.Answer) through the
    SavedModel's `classify_encoded`, in batches of `limits.batch_size` files (fewer at the
    end of a bundle) within `limits.max_request_bytes`, as the local driver's."""

    def __init__(self, path: str | pathlib.Path, class_names: Sequence[str],
                 limits: classify.RequestLimits):
        super().__init__(min_batch_size=limits.batch_size, max_batch_size=limits.batch_size,
                         max_batch_weight=limits.max_request_bytes,
                         element_size_fn=_content_bytes)
        self.path, self.class_names = str(path), list(class_names)

    def load_model(self):
        return tf.saved_model.load(self.path)

    def run_inference(self, batch: Sequence[tuple[str, bytes]], model,
                      inference_args=None) -> Iterable[PredictionResult]:
        paths = [path for path, _ in batch]
        found = classify.classify(model, self.class_names, paths,
                                  [content for _, content in batch])
        return [PredictionResult(path, answer)
                for path, answer in zip(paths, found, strict=True)]

    def get_num_bytes(self, batch: Sequence[tuple[str, bytes]]) -> int:
        return sum(map(_content_bytes, batch))


class _Read(beam.DoFn):
    """A JSON line naming a file -> (path, bytes), or the JSON line of its error on the
    tagged output."""

    def __init__(self, max_image_bytes: int):
        self.max_image_bytes = max_image_bytes

    def process(self, line: str):
        path = json.loads(line)
        content, reason = classify.read(path, self.max_image_bytes)
        if content is None:
            yield beam.pvalue.TaggedOutput(_UNREAD, _error_line((path, reason)))
        else:
            yield path, content


def _error_line(error: tuple[str, str]) -> str:
    return json.dumps({"error": list(error)})


def _answer_line(result: PredictionResult) -> str:
    answer = result.inference
    if isinstance(answer, classify.Prediction):
        return json.dumps({"prediction": dataclasses.asdict(answer)})
    return _error_line(answer)


def predict(path: str | pathlib.Path, class_names: Sequence[str],
            limits: classify.RequestLimits, files: Sequence[str],
            pipeline_args: Sequence[str] = (), work_dir: str | pathlib.Path = "."
            ) -> tuple[list[classify.Prediction], list[tuple[str, str]]]:
    """The answers of `pipeline.predict.predict` for the SavedModel at `path`, sorted by
    path. The list of files and the answers pass through a folder made in `work_dir`
    (created if needed) and removed."""
    work_dir = pathlib.Path(work_dir)
    created = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=".predict-beam-", dir=work_dir))
    try:
        # JSON lines: one line per file whatever characters its path holds
        (work / "files.jsonl").write_text("".join(json.dumps(f) + "\n" for f in files),
                                          encoding="utf-8")
        with make_pipeline(pipeline_args) as pipeline:
            read = (pipeline | "List" >> beam.io.ReadFromText(str(work / "files.jsonl"))
                    | "Spread" >> beam.Reshuffle()
                    | "Read" >> beam.ParDo(_Read(limits.max_image_bytes)).with_outputs(
                        _UNREAD, main="contents"))
            answered = (read.contents
                        | "Classify" >> RunInference(EncodedImagesHandler(path, class_names,
                                                                          limits))
                        | "Answers" >> beam.Map(_answer_line))
            _ = ((answered, read[_UNREAD]) | "All" >> beam.Flatten()
                 | "Write" >> beam.io.WriteToText(str(work / "answers.jsonl"),
                                                  shard_name_template=""))
        lines = (work / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(work_dir.iterdir()):
            work_dir.rmdir()  # a failed run leaves no empty --out
    predictions, errors = [], []
    for line in lines:
        entry = json.loads(line)
        if "prediction" in entry:
            predictions.append(classify.Prediction(**entry["prediction"]))
        else:
            errors.append(tuple(entry["error"]))
    return sorted(predictions, key=lambda p: p.path), sorted(errors)
