"""Export: model + thresholds -> SavedModel at <export_dir>/<model_name>/<version>/.

The chosen percentile's thresholds become variables of the model; all calibrated thresholds
and a model card travel in assets/, the model card and TF Serving warmup requests in
assets.extra/.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from pipeline import artifacts, faults
from pipeline.run_dir import ExportRecord, rejecting_classifier
from sdim_tf import data, publish, rejection, serving

WARMUP_FILE = "tf_serving_warmup_requests"


def warmup_records(model_name: str, images: np.ndarray) -> bytes:
    """PredictionLog records (TFRecord framing) asking serving_default about `images`."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    folder = tempfile.mkdtemp()
    path = pathlib.Path(folder) / "warmup"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in (images[:1], images):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name,
                                               signature_name="serving_default"))
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch, tf.float32))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    content = path.read_bytes()
    shutil.rmtree(folder)
    return content


def rejection_card(calibration) -> dict:
    """The model card's "rejection": the score, and per refusal its rule, thresholds and
    promise in words (None: it promises nothing), with what both cost on held-out images."""
    saved, deployed = calibration.saved, calibration.saved["deployed"]
    promises = calibration.promises()
    ambiguity = deployed.get("ambiguity")
    return {"score": calibration.score.description,
            "percentile": deployed["percentile"], "percentile_rule": deployed["rule"],
            "guarantee": promises[rejection.UNFAMILIAR],
            "thresholds": saved["percentiles"][deployed["percentile"]]["thresholds"],
            "min_gap": calibration.min_gap(),
            "refusals": {
                rejection.UNFAMILIAR: {"rule": deployed["rule"],
                                       "grouping": deployed.get("grouping"),
                                       "promise": promises[rejection.UNFAMILIAR]},
                rejection.AMBIGUOUS: None if ambiguity is None else {
                    "rule": ambiguity["rule"], "min_gap": calibration.min_gap(),
                    "max_error": ambiguity.get("max_error"),
                    "confidence": ambiguity.get("confidence"),
                    "promise": promises[rejection.AMBIGUOUS]}},
            "held_out": deployed.get("held_out")}


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    examples, trained, calibration = upstream["ingest"], upstream["train"], upstream["calibrate"]
    shape = examples.image_shape
    saved = calibration.saved  # the deployed refusals are calibrate's choice
    module = rejecting_classifier(examples, trained, calibration, config.export.limits)
    report = upstream["evaluate"].report()
    name = f"{trained.kind}_{examples.dataset_name}"
    card = {
        "model_name": name, "dataset": examples.dataset_name,
        "class_names": examples.class_names,
        "input": {"serving_default": f"float32 [batch, {data.IMAGE_SIZE}, {data.IMAGE_SIZE}, "
                                     f"{shape[-1]}] in [0, 1]",
                  "classify_raw": f"uint8 [batch, {shape[0]}, {shape[1]}, {shape[-1]}]",
                  "classify_encoded": "string [batch] of PNG/JPEG bytes"},
        "rejection": rejection_card(calibration),
        "limits": {**dataclasses.asdict(module.limits), "meaning": serving.Limits.__doc__},
        "reasons": serving.REASONS,
        "training": trained.settings,
        "best_epoch": trained.state()["best_epoch"],
        "metrics": {k: report[k] for k in ("accuracy", "selective", "ood")},
        "versions": artifacts.package_versions(),
    }
    sample = next(iter(examples.dataset("test", limit=4, batch_size=4)))[0].numpy()
    path = publish.export(  # real test images for the warmup requests
        module, config.export.export_dir, name,
        extra_assets={"thresholds.json": publish.json_bytes(saved),
                      "model_card.json": publish.json_bytes(card)},
        assets_extra={"model_card.json": publish.json_bytes(card),
                      WARMUP_FILE: warmup_records(name, sample)},
        before_rename=lambda folder: faults.point("serving.before_rename"))
    logging.info("export: wrote %s", path)
    ExportRecord(stage_dir).write_record(path, name)
    return [ExportRecord.EXPORT_JSON]
