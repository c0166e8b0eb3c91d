"""Per-split statistics of ingested examples (TFX StatisticsGen's share of ingest), kept as
exact integer sums so that any order of accumulation (a stream, Beam workers) gives the
same figures."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class SplitStats:
    """Class counts and pixel moments of the uint8 images of one split."""

    num_classes: int
    class_counts: list[int] = dataclasses.field(default_factory=list)
    pixel_sum: int = 0
    pixel_squares: int = 0
    pixels: int = 0

    CHUNK = 1 << 20  # pixels summed at a time

    def __post_init__(self):
        if not self.class_counts:
            self.class_counts = [0] * self.num_classes

    def add(self, images: np.ndarray, labels: np.ndarray) -> SplitStats:
        """Counts uint8 images [N, H, W, C] with labels [N] in [0, num_classes)."""
        labels = np.asarray(labels, np.int64).reshape(-1)
        counts = np.bincount(labels, minlength=self.num_classes)
        self.class_counts = [a + int(b) for a, b in zip(self.class_counts, counts, strict=True)]
        values = np.asarray(images, np.uint8).reshape(-1)
        for start in range(0, values.size, self.CHUNK):  # bounded temporaries
            chunk = values[start:start + self.CHUNK]
            self.pixel_sum += int(chunk.sum(dtype=np.uint64))
            # 255^2 fits uint16; the sum of squares does not, hence uint64
            self.pixel_squares += int(np.square(chunk, dtype=np.uint16).sum(dtype=np.uint64))
        self.pixels += int(values.size)
        return self

    def merge(self, other: SplitStats) -> SplitStats:
        return SplitStats(self.num_classes,
                          [a + b for a, b in zip(self.class_counts, other.class_counts,
                                                 strict=True)],
                          self.pixel_sum + other.pixel_sum,
                          self.pixel_squares + other.pixel_squares, self.pixels + other.pixels)

    @property
    def num_examples(self) -> int:
        return sum(self.class_counts)

    def as_dict(self) -> dict:
        """num_examples, class_counts, and pixel mean and std in [0, 1] units."""
        n = max(self.pixels, 1)
        variance = (n * self.pixel_squares - self.pixel_sum ** 2) / n ** 2  # exact numerator
        return {"num_examples": self.num_examples, "class_counts": list(self.class_counts),
                "pixel_mean": self.pixel_sum / n / 255.0,
                "pixel_std": math.sqrt(max(variance, 0.0)) / 255.0}
