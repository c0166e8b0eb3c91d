"""Export: model + thresholds -> SavedModel at <export_dir>/<model_name>/<version>/.

The chosen percentile's thresholds become variables of the model; all calibrated thresholds
and a model card travel in assets/, the model card and TF Serving warmup requests in
assets.extra/.

Before writing, a gate (TFX's Evaluator "blessing") reads the evaluate stage's test figures:
it refuses, in one line, a model whose test accuracy is not clearly above chance or whose
deployed rule rejects far more test images than its budget (`gate`); --force_export exports
it anyway. Without --export_dir the model goes into the run's own <run_dir>/saved_models; a
run on --train_limit images publishes into an --export_dir only with --export_subset.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging
from scipy import stats

from pipeline import artifacts, faults, selection
from pipeline.config import ConfigError
from pipeline.run_dir import ExportRecord, rejecting_classifier
from sdim_tf import data, publish, rejection, robust, serving

WARMUP_FILE = "tf_serving_warmup_requests"
# The gate's one-sided binomial tests on the test images: refused when the accuracy is not
# above chance, or the rejections above twice the budget, at this significance.
GATE_LEVEL = 0.01


class ExportRefused(ConfigError):
    """The gate refused the model; the message names the figures."""


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
            "ambiguity_unsupported": deployed.get("ambiguity_unsupported"),
            "held_out": deployed.get("held_out")}


def model_name(examples, kind: str) -> str:
    """The default --model_name: the dataset's name (an image folder's own folder name),
    + _discriminative for the baseline, as a folder and TF Serving model name."""
    name = examples.dataset_name
    for source in examples.metadata.get("sources", []):
        origin, _, where = str(source.get("source", "")).partition(":")
        if origin == "image_folder" and name == "image_folder":
            name = pathlib.Path(where).name or name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "image_folder"
    return name if kind == "sdim" else f"{name}_discriminative"


def gate(report: dict, saved: dict, num_classes: int) -> dict:
    """The test figures export checks, and what they fail ("failures", empty: exportable):
    accuracy against chance 1/C, and the deployed rule's test rejections against twice its
    budget (alpha, or the percentile; at least the 1/(n+1) its n calibration images can
    resolve), each by a one-sided binomial test at GATE_LEVEL."""
    n, accuracy = int(report["num_test"]), float(report["accuracy"])
    correct, chance = int(round(accuracy * n)), 1.0 / num_classes
    deployed = saved["deployed"]
    key = deployed["percentile"]
    nominal = deployed.get("alpha") or float(key) / 100.0
    budget = max(nominal, 1.0 / (saved["examples"]["num_samples"] + 1))
    rejected = float(report["selective"][key]["reject_rate"])
    count = int(round(rejected * n))
    p_accuracy = float(stats.binom.sf(correct - 1, n, chance))  # P(>= correct | chance)
    p_rejected = float(stats.binom.sf(count - 1, n, min(2 * budget, 1.0)))
    failures = []
    if p_accuracy >= GATE_LEVEL:
        failures.append(f"test accuracy {100 * accuracy:.1f}% ({correct}/{n}) is not clearly "
                        f"above chance {100 * chance:.1f}% (binomial p={p_accuracy:.2g})")
    if p_rejected < GATE_LEVEL:
        failures.append(f"the deployed rule rejects {100 * rejected:.1f}% of the test images "
                        f"({count}/{n}), far more than twice its budget {100 * budget:.1f}% "
                        f"(binomial p={p_rejected:.2g})")
    return {"test_images": n, "accuracy": accuracy, "chance": chance,
            "p_accuracy_at_chance": p_accuracy, "rejected": rejected, "budget": budget,
            "p_rejected_at_twice_budget": p_rejected, "level": GATE_LEVEL,
            "failures": failures}


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    examples, trained, calibration = upstream["ingest"], upstream["train"], upstream["calibrate"]
    settings = config.export
    refusal = selection.subset_refusal(trained.settings.get("train_limit"),
                                       settings.export_dir, settings.export_subset)
    if refusal:
        raise ConfigError(refusal)
    shape = examples.image_shape
    saved = calibration.saved  # the deployed refusals are calibrate's choice
    report = upstream["evaluate"].report()
    blessing = gate(report, saved, examples.num_classes)
    if blessing["failures"]:
        if not settings.force_export:
            raise ExportRefused(f"export refused: {'; '.join(blessing['failures'])}; see "
                                f"{upstream['evaluate'].folder / 'report.md'} (more images or "
                                "epochs may help); --force_export exports it anyway")
        logging.warning("export: --force_export: exporting although %s",
                        "; ".join(blessing["failures"]))
    module = rejecting_classifier(examples, trained, calibration, settings.limits)
    name = settings.model_name or model_name(examples, trained.kind)
    state = trained.state()
    card = {
        "model_name": name, "dataset": examples.dataset_name,
        "class_names": examples.class_names,
        "input": {"serving_default": f"float32 [batch, {data.IMAGE_SIZE}, {data.IMAGE_SIZE}, "
                                     f"{shape[-1]}] in [0, 1]",
                  "classify_raw": f"uint8 [batch, {shape[0]}, {shape[1]}, {shape[-1]}]",
                  "classify_encoded": "string [batch] of PNG/JPEG bytes"},
        "rejection": {**rejection_card(calibration), "density_fit": saved.get("density_fit")},
        "gate": {**blessing, "forced": bool(blessing["failures"])},
        "limits": {**dataclasses.asdict(module.limits), "meaning": serving.Limits.__doc__},
        "reasons": serving.REASONS,
        "training": trained.settings,
        "threat_model": robust.RobustTraining.from_settings(trained.settings).threat_model(),
        "best_epoch": state["best_epoch"],
        "stopped_early": state.get("stopped_early"),
        "metrics": {k: report[k] for k in ("accuracy", "selective", "ood")},
        "versions": artifacts.package_versions(),
    }
    sample = next(iter(examples.dataset("test", limit=4, batch_size=4)))[0].numpy()
    path = publish.export(  # real test images for the warmup requests
        module, settings.destination, name,
        extra_assets={"thresholds.json": publish.json_bytes(saved),
                      "model_card.json": publish.json_bytes(card)},
        assets_extra={"model_card.json": publish.json_bytes(card),
                      WARMUP_FILE: warmup_records(name, sample)},
        before_rename=lambda folder: faults.point("serving.before_rename"))
    logging.info("export: wrote %s", path)
    ExportRecord(stage_dir).write_record(path, name)
    return [ExportRecord.EXPORT_JSON]
