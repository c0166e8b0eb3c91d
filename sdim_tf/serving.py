"""What a run deploys, as one object: a scoring model, its thresholds and the decision rule.

`RejectingClassifier` is used in memory (evaluation, explanations, attacks) and exported as
a SavedModel with three signatures that classify and reject, with input validation:

`serving_default` takes float32 images [N, 32, 32, C] in [0, 1]; `classify_raw` takes uint8
images at the dataset's source size and preprocesses them with `data.preprocess` (the
training pipeline's own function); `classify_encoded` takes PNG/JPEG bytes. Rows with NaN,
Inf or pixels outside [0, 1] are answered as rejected; the rest of the batch is classified.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from sdim_tf import data, rejection

SIGNATURES = ("serving_default", "classify_raw", "classify_encoded")


class RejectingClassifier(tf.Module):
    """A scoring model + per-class thresholds -> predictions with the rejection decision.

    `model` maps float32 images [N, 32, 32, C] to class scores [N, C] and has
    `scores_and_logits` (a trained classifier, or its fitted `density.FeatureDensity`).
    """

    def __init__(self, model, thresholds: Sequence[float], channels: int,
                 source_size: Sequence[int], class_names: Sequence[str] | None = None,
                 name: str = "rejecting_classifier"):
        super().__init__(name=name)
        self.model = model
        self.num_classes = len(thresholds)
        self.class_names = list(class_names) if class_names is not None else None
        self.channels = int(channels)
        self.source_size = tuple(int(s) for s in source_size)
        # +inf (a class never correctly classified in calibration) stays +inf: always rejected.
        self.thresholds = tf.Variable(np.asarray(thresholds, np.float32), trainable=False,
                                      name="thresholds")
        # Unknown rank in the signatures, so that every shape mistake reaches our checks
        # and gets a message naming the expected shape.
        self.serving_default = tf.function(self._serving_default, input_signature=[
            tf.TensorSpec(None, tf.float32, name="images")])
        self.classify_raw = tf.function(self._classify_raw, input_signature=[
            tf.TensorSpec(None, tf.uint8, name="images")])
        self.classify_encoded = tf.function(self._classify_encoded, input_signature=[
            tf.TensorSpec([None], tf.string, name="images")])

    def _check_shape(self, images, height, width, signature):
        """images with static shape [None, height, width, C], or InvalidArgument naming it."""
        expected = f"[batch, {height}, {width}, {self.channels}]"
        message = f"{signature}: images must be {expected} (batch, height, width, channels)"
        rank_ok = tf.debugging.assert_equal(tf.rank(images), 4, message=message)
        with tf.control_dependencies([rank_ok]):
            shape = tf.shape(images)
            # Padded so that the comparison is well formed whatever the rank was.
            dims = tf.concat([shape, [0, 0, 0, 0]], 0)[1:4]
            dims_ok = tf.debugging.assert_equal(
                dims, tf.constant([height, width, self.channels]), message=message)
        with tf.control_dependencies([dims_ok]):
            return tf.ensure_shape(tf.identity(images), [None, height, width, self.channels])

    def _classify(self, images):
        """float32 [N, 32, 32, C] -> the output dict (invalid rows rejected)."""
        valid = tf.reduce_all(tf.math.is_finite(images) & (images >= 0.0) & (images <= 1.0),
                              axis=[1, 2, 3])
        clean = tf.where(valid[:, None, None, None], images, tf.zeros_like(images))
        scores, ll = self.model.scores_and_logits(clean)
        invalid = tf.fill(tf.shape(ll), -np.inf)
        scores = tf.where(valid[:, None], tf.cast(scores, tf.float32), invalid)
        ll = tf.where(valid[:, None], tf.cast(ll, tf.float32), invalid)
        decision = rejection.decide(scores, self.thresholds, valid)
        probabilities = tf.where(valid[:, None], tf.nn.softmax(ll), tf.zeros_like(ll))
        return {"class_scores": scores, "log_likelihoods": ll,
                "class_ids": decision.class_ids, "max_log_likelihood": tf.reduce_max(ll, axis=1),
                "score": decision.score, "threshold": decision.threshold,
                "rejected": decision.rejected, "probabilities": probabilities}

    def class_scores(self, batches) -> tuple[np.ndarray, np.ndarray]:
        """(class scores [N, C] float64, labels [N]) over (images, labels) batches."""
        return rejection.class_scores(self.model, batches)

    def decide(self, scores) -> rejection.Decision:
        """The deployed rule on class scores from `class_scores`."""
        return rejection.decide(scores, self.thresholds)

    def _serving_default(self, images):
        images = self._check_shape(images, data.IMAGE_SIZE, data.IMAGE_SIZE, "serving_default")
        return self._classify(images)

    def _classify_raw(self, images):
        images = self._check_shape(images, *self.source_size, "classify_raw")
        return self._classify(data.preprocess(images))

    def _classify_encoded(self, images):
        header = tf.strings.substr(images, 0, 3)
        known = (header == b"\x89PN") | (header == b"\xff\xd8\xff")
        check = tf.debugging.assert_equal(
            tf.reduce_all(known), True,
            message="classify_encoded: every element must be PNG or JPEG bytes")
        with tf.control_dependencies([check]):  # else DecodeImage may fail first
            images = tf.identity(images)

        def decode(encoded):
            image = tf.io.decode_image(encoded, channels=self.channels, expand_animations=False)
            image.set_shape([None, None, self.channels])
            return data.preprocess(image[None])[0]

        decoded = tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec(
            [data.IMAGE_SIZE, data.IMAGE_SIZE, self.channels], tf.float32))
        return self._classify(decoded)

    def archive(self):
        """A keras.export.ExportArchive of the three signatures.

        Keras' archive tracks the Keras 3 variables the way TF1-style loaders
        (`saved_model_cli run`, TF Serving) can restore; a plain tf.Module holding the model
        loses the batch-norm moving statistics there.
        """
        import keras

        archive = keras.export.ExportArchive()
        archive.track(self.model)
        archive.track(self)  # the thresholds variable
        for name in SIGNATURES:
            function = getattr(self, name)
            archive.add_endpoint(name, function.python_function, function.input_signature)
        return archive


def next_version(model_dir: pathlib.Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] \
        if model_dir.exists() else []
    return max(versions, default=0) + 1


def export(module: RejectingClassifier, export_dir: str | os.PathLike, model_name: str,
           extra_assets: dict[str, bytes] | None = None,
           assets_extra: dict[str, bytes] | None = None) -> pathlib.Path:
    """Saves `module` as `<export_dir>/<model_name>/<next version>/` (TF Serving layout).

    Written into a temporary folder and renamed into place, so a polling server never sees
    a partial version; an existing version is never overwritten.
    """
    model_dir = pathlib.Path(export_dir) / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".export-tmp-", dir=model_dir))
    try:
        module.archive().write_out(str(tmp), verbose=False)
        for folder, files in (("assets", extra_assets), ("assets.extra", assets_extra)):
            (tmp / folder).mkdir(exist_ok=True)
            for name, content in (files or {}).items():
                (tmp / folder / name).write_bytes(content)
        while True:
            final = model_dir / str(next_version(model_dir))
            try:
                os.rename(tmp, final)  # fails if another export took this version
                return final
            except OSError:
                if not final.exists():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
