"""The model the serving benchmarks and their tests export: an untrained SDIM ResNet10 of the
default configuration for 28 x 28 grey images. Its weights do not change what they measure
(cost, refusals, answers under load), and it needs no training run.

Imported by the parent processes only: the TensorFlow-only workers never load pipeline.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.stages import train
from sdim_tf import data, publish, serving


def config(kind: str = "sdim", critic: str = "concat") -> PipelineConfig:
    return PipelineConfig.from_flat(model=kind, critic=critic, epochs=0).resolve()


def model(kind: str = "sdim", critic: str = "concat"):
    resolved = config(kind, critic)
    return train.build_model(resolved.model, resolved.train, num_classes=10, channels=1)


def export(export_dir: str | os.PathLike, name: str, raw: np.ndarray | None = None
           ) -> tuple[pathlib.Path, serving.RejectingClassifier]:
    """(SavedModel path, the module exported). Thresholds 0, or with uint8 images `raw`
    [N, 28, 28, 1] every threshold at the median of their scores, so that about half of the
    valid rows are accepted and half rejected."""
    module = serving.RejectingClassifier(model(), np.zeros(10), 1, (28, 28))
    if raw is not None:
        scores = module.serving_default(data.preprocess(raw))["score"].numpy()
        module.thresholds.assign(np.full(10, np.median(scores), np.float32))
    return publish.export(module, export_dir, name), module
