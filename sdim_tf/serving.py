"""What a run deploys, as one object: a scoring model, its thresholds and the decision rule.

`RejectingClassifier` is used in memory (evaluation, explanations, attacks) and exported
(`sdim_tf.publish`) as a SavedModel with three signatures that classify and reject, with
input validation:

`serving_default` takes float32 images [N, 32, 32, C] in [0, 1]; `classify_raw` takes uint8
images at the dataset's source size and preprocesses them with `data.preprocess` (the
training pipeline's own function); `classify_encoded` takes PNG/JPEG bytes. Rows with NaN,
Inf or pixels outside [0, 1] are answered as rejected; the rest of the batch is classified.

Every output follows the deployed score `class_scores`: `class_ids` is its argmax,
`class_name` that class's name, `probabilities` its softmax (argmax `class_ids`), `score`
and `gap` its best value and margin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from sdim_tf import data, encoded, folding, rejection
from sdim_tf.settings import setting

SIGNATURES = ("serving_default", "classify_raw", "classify_encoded")
# Not a classifier: the float images classify_encoded would classify, for tools that take
# gradients of serving_default with respect to them (saliency maps of `pipeline.predict`).
PREPROCESS_SIGNATURE = "preprocess_encoded"
# Every answer's `reason`: empty when accepted, else why the row was refused.
REASONS = {
    "": "accepted",
    rejection.UNFAMILIAR: "a valid input whose score is below its class's threshold",
    rejection.AMBIGUOUS: "a valid input above its threshold whose gap between the two best "
                         "class scores is below the ambiguity threshold (min_gap)",
    "non_finite": "a pixel is NaN or infinite (float signature)",
    "out_of_range": "a pixel lies outside [0, 1] (float signature)",
    "not_png_or_jpeg": "the bytes start with neither the PNG nor the JPEG signature (GIF, "
                       "BMP, WebP, text, ...)",
    "bad_header": "PNG/JPEG signature, but no image size in the header",
    "unsupported_jpeg": "a JPEG the decoder cannot read: a frame not baseline, extended or "
                        "progressive Huffman (lossless, arithmetic, ...), samples not 8-bit, "
                        "or components neither 1 nor 3 (CMYK, ...)",
    "too_large": "more bytes than max_image_bytes, or a side over max_image_side, as the "
                 "header declares (refused before decoding)",
}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may cost. Per image and per request, since per-image caps multiply
    with the batch; a request over max_batch, max_request_bytes or max_request_pixels is
    refused whole."""

    max_image_side: int = setting(4096, "Export: classify_encoded refuses (reason too_large) "
                                  "an image whose header declares a longer side.")
    max_image_bytes: int = setting(4 << 20, "Export: ... or more bytes.")
    max_request_bytes: int = setting(64 << 20, "Export: classify_encoded refuses a request of "
                                     "more bytes (InvalidArgument).")
    # Two 4096 x 4096 images. A 142 KB 16-bit RGBA PNG of 4096 x 4096 took 0.4 s to decode
    # (2 cores); 64 of them, within the byte caps, took ~26 s.
    max_request_pixels: int = setting(
        2 * 4096 * 4096, "Export: classify_encoded refuses a request whose images' headers "
        "declare more pixels in all (InvalidArgument; decoding time grows with them).")
    # At 1024 the fuzz bench's resident memory grew 772 MiB over its post-load baseline
    # (budget 512 MiB), at <= 256 it stayed within.
    max_batch: int = setting(256, "Export: every signature refuses a request of more images "
                             "(InvalidArgument).")


class RejectingClassifier(tf.Module):
    """A scoring model + per-class thresholds -> predictions with the rejection decision.

    `model` maps float32 images [N, 32, 32, C] to class scores [N, C] and has
    `scores_and_logits` (a trained classifier, or its fitted `density.FeatureDensity`).
    `min_gap` (see `rules.ambiguous`): also refuse, as ambiguous, the inputs whose gap
    between the two best class scores is below it; None: no input is ambiguous.
    """

    def __init__(self, model, thresholds: Sequence[float], channels: int,
                 source_size: Sequence[int], class_names: Sequence[str] | None = None,
                 limits: Limits | None = None, min_gap: float | None = None,
                 name: str = "rejecting_classifier"):
        super().__init__(name=name)
        self.model = model
        self.limits = limits or Limits()
        self.num_classes = len(thresholds)
        self.class_names = list(class_names) if class_names is not None else None
        # the `class_name` output: REST clients read no assets
        self._names = tf.constant(self.class_names or [str(c) for c in range(len(thresholds))])
        self.channels = int(channels)
        self.source_size = tuple(int(s) for s in source_size)
        # +inf (a class never correctly classified in calibration) stays +inf: always rejected.
        self.thresholds = tf.Variable(np.asarray(thresholds, np.float32), trainable=False,
                                      name="thresholds")
        self.min_gap = None if min_gap is None else tf.Variable(
            np.float32(min_gap), trainable=False, name="min_gap")
        # One function scores for every signature: an export then holds the model's graph
        # (and a folded model's constant weights, `folding.FoldedScorer`) once.
        self._scores = tf.function(lambda images: self.model.scores_and_logits(images)[0],
                                   input_signature=[tf.TensorSpec(
                                       [None, data.IMAGE_SIZE, data.IMAGE_SIZE, self.channels],
                                       tf.float32)])
        # Unknown rank in the signatures, so that every shape mistake reaches our checks
        # and gets a message naming the expected shape.
        self.serving_default = tf.function(self._serving_default, input_signature=[
            tf.TensorSpec(None, tf.float32, name="images")])
        self.classify_raw = tf.function(self._classify_raw, input_signature=[
            tf.TensorSpec(None, tf.uint8, name="images")])
        self.classify_encoded = tf.function(self._classify_encoded, input_signature=[
            tf.TensorSpec(None, tf.string, name="images")])
        self.preprocess_encoded = tf.function(self._preprocess_encoded, input_signature=[
            tf.TensorSpec(None, tf.string, name="images")])

    def _check_shape(self, images, height, width, signature):
        """images with static shape [None, height, width, C], or InvalidArgument naming it."""
        expected = f"[batch, {height}, {width}, {self.channels}]"
        message = f"{signature}: images must be {expected} (batch, height, width, channels)"
        shape = tf.shape(images)
        # Padded so that the comparison is well formed whatever the rank was.
        padded = tf.concat([shape, [0, 0, 0, 0]], 0)
        shape_ok = tf.equal(tf.size(shape), 4) & tf.reduce_all(
            tf.equal(padded[1:4], [height, width, self.channels]))
        return self._gate(images, [None, height, width, self.channels],
                          [(shape_ok, [message, "got", shape])], padded[0], signature)

    def _gate(self, images, shape, checks, batch, signature):
        """`images` reshaped to `shape` (None: any size) when `_passes(checks)` and `batch`
        is within max_batch; else an empty batch, and the call fails."""
        ok = self._passes([*checks, (
            batch <= self.limits.max_batch,
            [f"{signature}: at most max_batch={self.limits.max_batch} images per request",
             "got", batch])])
        return tf.cond(ok, lambda: tf.reshape(images, [-1 if d is None else d for d in shape]),
                       lambda: tf.zeros([0 if d is None else d for d in shape], images.dtype))

    @staticmethod
    def _passes(checks):
        """True when every (condition, assert data) of `checks` holds; else False, and the
        failed check's assert fails the call with its message. Gate the work on it with a
        `tf.cond`.

        Grappler drops the control edges that ordered such asserts before the ops using
        the input: a [7, 32, 32, 1, 1] request failed in EnsureShape, a scalar in a strided
        slice, with messages naming nothing (found by bench/fuzz_signatures.py). Behind the
        cond no op but the asserts can fail on a bad request, and a refused one computes
        nothing.
        """
        asserts = [tf.debugging.Assert(ok, data) for ok, data in checks]
        ok = tf.constant(True)
        for condition, _ in checks:
            ok &= condition
        with tf.control_dependencies(asserts):
            return tf.identity(ok)

    def _classify(self, images, refused=None):
        """float32 [N, 32, 32, C] -> the output dict. Invalid rows are rejected with their
        reason: `refused` (string [N], "" for rows that passed) from the encoded path, then
        the pixel checks."""
        finite = tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3])
        in_range = tf.reduce_all((images >= 0.0) & (images <= 1.0), axis=[1, 2, 3])
        valid = finite & in_range
        if refused is not None:
            valid &= tf.equal(refused, "")
        # Scalars broadcast in the selects: an op per request fewer than a filled tensor.
        clean = tf.where(valid[:, None, None, None], images, 0.0)
        # Only the deployed score is answered: the classifier's own logits (the SDIM head's
        # log-likelihoods) can name another class than the density's argmax.
        scores = self._scores(clean)
        rows = valid[:, None]
        scores = tf.where(rows, tf.cast(scores, tf.float32), -np.inf)
        decision = rejection.decide(scores, self.thresholds, valid, self.min_gap)
        probabilities = tf.where(rows, tf.nn.softmax(scores), 0.0)
        reason = tf.where(~finite, "non_finite",
                          tf.where(~in_range, "out_of_range", decision.reasons()))
        if refused is not None:
            reason = tf.where(tf.not_equal(refused, ""), refused, reason)
        return {"class_scores": scores, "class_ids": decision.class_ids,
                "class_name": tf.gather(self._names, decision.class_ids),
                "score": decision.score, "threshold": decision.threshold,
                "gap": decision.gap, "min_gap": decision.min_gap,
                "rejected": decision.rejected, "reason": reason,
                "probabilities": probabilities}

    def class_scores(self, batches) -> tuple[np.ndarray, np.ndarray]:
        """(class scores [N, C] float64, labels [N]) over (images, labels) batches."""
        return rejection.class_scores(self.model, batches)

    def decide(self, scores) -> rejection.Decision:
        """The deployed rule on class scores from `class_scores`."""
        return rejection.decide(scores, self.thresholds, min_gap=self.min_gap)

    def _serving_default(self, images):
        images = self._check_shape(images, data.IMAGE_SIZE, data.IMAGE_SIZE, "serving_default")
        return self._classify(images)

    def _classify_raw(self, images):
        images = self._check_shape(images, *self.source_size, "classify_raw")
        return self._classify(data.preprocess(images))

    def _classify_encoded(self, images):
        return self._classify(*self._decode(images))

    def _preprocess_encoded(self, images):
        """{"images": float32 [N, 32, 32, C] as serving_default takes them (zeros for a
        refused row), "reason": "" or why the row was refused}."""
        decoded, refused = self._decode(images)
        return {"images": decoded, "reason": refused}

    def _decode(self, images):
        """string [N] -> (float32 [N, 32, 32, C], refusal reason [N]); checks the request's
        limits and each header, and decodes only the elements that passed."""
        limits = self.limits
        # Unknown rank in the signature: a loaded signature does not enforce a declared
        # [None], and a string tensor of another rank failed deep in the graph ("The second
        # input must be a scalar").
        shape = tf.shape(images)
        total = tf.reduce_sum(tf.cast(tf.strings.length(images), tf.int64))  # any rank
        images = self._gate(images, [None], [
            (tf.equal(tf.size(shape), 1),
             ["classify_encoded: images must be [batch] (a vector of PNG/JPEG bytes)", "got",
              shape]),
            (total <= limits.max_request_bytes,
             [f"classify_encoded: at most max_request_bytes={limits.max_request_bytes} bytes "
              "per request", "got", total])], tf.size(images), "classify_encoded")
        kind, height, width = tf.map_fn(encoded.inspect, images, fn_output_signature=(
            tf.int32, tf.int32, tf.int32))
        refused = self._header_reason(images, kind, height, width)
        area = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
        pixels = tf.reduce_sum(tf.where(tf.equal(refused, ""), area, tf.zeros_like(area)))
        ok = self._passes([(pixels <= limits.max_request_pixels, [
            f"classify_encoded: at most max_request_pixels={limits.max_request_pixels} "
            "decoded pixels per request, as the headers declare", "got", pixels])])
        empty = (tf.zeros([0, data.IMAGE_SIZE, data.IMAGE_SIZE, self.channels]),
                 tf.zeros([0], tf.string))
        return tf.cond(ok, lambda: (self._decode_passed(images, refused), refused),
                       lambda: empty)

    def _header_reason(self, images, kind, height, width):
        """string [N]: each element's refusal reason read from its header, "" if it passed."""
        limits = self.limits
        return tf.where(
            tf.strings.length(images) > limits.max_image_bytes, "too_large",
            tf.where(tf.equal(kind, encoded.UNKNOWN), "not_png_or_jpeg",
                     tf.where((height <= 0) | (width <= 0), "bad_header",
                              tf.where(tf.equal(kind, encoded.UNSUPPORTED_JPEG),
                                       "unsupported_jpeg",
                                       tf.where(tf.maximum(height, width) > limits.max_image_side,
                                                "too_large", "")))))

    def _decode_passed(self, images, refused):
        """float32 [N, 32, 32, C]: the elements whose `refused` is "" decoded and
        preprocessed, one at a time; zeros for the others."""
        blank = tf.zeros([data.IMAGE_SIZE, data.IMAGE_SIZE, self.channels])

        def decode(image_bytes):
            image = tf.io.decode_image(image_bytes, channels=self.channels,
                                       expand_animations=False)
            image.set_shape([None, None, self.channels])
            return data.preprocess(image[None])[0]

        def one(args):
            image_bytes, reason = args
            return tf.cond(tf.equal(reason, ""), lambda: decode(image_bytes), lambda: blank)

        return tf.map_fn(one, (images, refused), parallel_iterations=1,
                         fn_output_signature=tf.TensorSpec(
                             [data.IMAGE_SIZE, data.IMAGE_SIZE, self.channels], tf.float32))

    def folded(self) -> RejectingClassifier:
        """This classifier with its encoder's batch norms folded into the layers before them
        (`sdim_tf.folding`): the same signatures, answers equal up to float rounding, and
        fewer ops per call. For inference only."""
        return RejectingClassifier(
            folding.FoldedScorer(self.model), self.thresholds.numpy(), self.channels,
            self.source_size, self.class_names, self.limits,
            None if self.min_gap is None else self.min_gap.numpy(), name=self.name)

    def archive(self, fold_batch_norm: bool = True):
        """A keras.export.ExportArchive of the three signatures, computed by `folded()`
        unless `fold_batch_norm` is False.

        Keras' archive tracks the Keras 3 variables the way TF1-style loaders
        (`saved_model_cli run`, TF Serving) can restore; a plain tf.Module holding the model
        loses the batch-norm moving statistics there.
        """
        import keras

        module = self.folded() if fold_batch_norm else self
        archive = keras.export.ExportArchive()
        archive.track(module.model)
        archive.track(module)  # the thresholds (and min_gap) variables
        for name in (*SIGNATURES, PREPROCESS_SIGNATURE):
            function = getattr(module, name)
            archive.add_endpoint(name, function.python_function, function.input_signature)
        return archive
