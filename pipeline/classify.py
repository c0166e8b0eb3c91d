"""Image files through a SavedModel's `classify_encoded`, shared by `pipeline.predict`'s
drivers (in process, and `pipeline.predict_beam` on Apache Beam): what one request may hold,
how a file is read within the model's limits, and one answer per file from the signature's
outputs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Union

import tensorflow as tf

ANSWERED = ("", "unfamiliar", "ambiguous")  # reasons of rows the model classified


@dataclasses.dataclass
class Prediction:
    path: str
    class_name: str
    score: float
    threshold: float
    rejected: bool
    reason: str

    @property
    def margin(self) -> float:
        return self.score - self.threshold

    def row(self) -> dict:
        return {"path": self.path, "class_name": self.class_name, "score": repr(self.score),
                "threshold": repr(self.threshold), "margin": repr(self.margin),
                "rejected": str(self.rejected).lower(), "reason": self.reason}


# A classified file, or (path, why it got no class)
Answer = Union[Prediction, tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """One request: at most `batch_size` files and `max_request_bytes` bytes; a file over
    `max_image_bytes` is not sent. Its fields are the keyword arguments of
    `pipeline.predict.batches`."""

    batch_size: int
    max_request_bytes: int
    max_image_bytes: int

    @classmethod
    def of(cls, limits: dict, batch_size: int) -> RequestLimits:
        """From the model card's `limits`, with at most `batch_size` files per request."""
        return cls(min(batch_size, limits["max_batch"]), limits["max_request_bytes"],
                   limits["max_image_bytes"])


def read(path: str, max_image_bytes: int) -> tuple[bytes | None, str]:
    """(the file's bytes, "") or (None, why it is not sent); an oversize file is not read."""
    try:
        if os.path.getsize(path) > max_image_bytes:
            return None, "too_large"
        return pathlib.Path(path).read_bytes(), ""
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"


def answers(outputs: dict, class_names: list[str], paths: list[str]) -> list[Answer]:
    """classify_encoded's outputs -> one answer per path, in order."""
    class_ids = outputs["class_ids"].numpy()
    score, threshold = outputs["score"].numpy(), outputs["threshold"].numpy()
    rejected, reasons = outputs["rejected"].numpy(), outputs["reason"].numpy()
    found: list[Answer] = []
    for i, path in enumerate(paths):
        reason = reasons[i].decode()
        found.append(Prediction(path, class_names[class_ids[i]], float(score[i]),
                                float(threshold[i]), bool(rejected[i]), reason)
                     if reason in ANSWERED else (path, reason))
    return found


def error_cause(message: str) -> str:
    """The line of a TensorFlow graph error that says what went wrong: the one before its
    `[[{{node ...}}]]` line (its first line is "Graph execution error:"), else the first."""
    lines = [line.strip() for line in message.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("[[") and i and lines[i - 1]:
            return lines[i - 1]
    return lines[0] if lines else ""


def classify(loaded, class_names: list[str], paths: list[str],
             contents: list[bytes]) -> list[Answer]:
    """One answer per file of one request to the loaded SavedModel. A request the model
    refuses whole (a body that fails to decode after a valid header, more pixels than
    max_request_pixels) is retried file by file, so that one bad file costs only itself."""
    try:
        outputs = loaded.signatures["classify_encoded"](images=tf.constant(contents, tf.string))
    except tf.errors.InvalidArgumentError as e:
        if len(paths) == 1:
            return [(paths[0], "decode_failed: " + error_cause(e.message)[:200])]
        return [answer for path, content in zip(paths, contents, strict=True)
                for answer in classify(loaded, class_names, [path], [content])]
    return answers(outputs, class_names, paths)


def split(found: list[Answer]) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """(the predictions, the (path, reason) of the files that got no class)."""
    return ([a for a in found if isinstance(a, Prediction)],
            [a for a in found if not isinstance(a, Prediction)])
