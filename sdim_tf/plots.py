"""Matplotlib figures (headless): class-conditional histograms with thresholds."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def class_histograms(in_ll: np.ndarray, in_labels: np.ndarray, ood_ll: np.ndarray,
                     thresholds: Sequence[float], class_names: Sequence[str],
                     path: str | os.PathLike, ood_name: str = "OOD") -> None:
    """Paper Figure 2 style: per class c, log p(x|c) of test samples of class c, of the OOD
    samples, and the threshold delta_c."""
    num = len(class_names)
    cols = min(5, num)
    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for c, ax in enumerate(axes.flat):
        if c >= num:
            ax.axis("off")
            continue
        inside = in_ll[in_labels == c, c]
        outside = ood_ll[:, c]
        low = np.percentile(np.concatenate([inside, outside]), 1)
        high = max(inside.max(initial=-np.inf), outside.max(initial=-np.inf))
        bins = np.linspace(low, high, 40)
        ax.hist(np.clip(inside, low, None), bins, alpha=0.6, density=True, label="in (test)")
        ax.hist(np.clip(outside, low, None), bins, alpha=0.6, density=True, label=ood_name)
        if np.isfinite(thresholds[c]):
            ax.axvline(thresholds[c], color="k", linestyle="--", linewidth=1, label="threshold")
        ax.set_title(f"{c}: {class_names[c]}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("log p(x | y=c)  (values below the 1st percentile of the plot are clipped)",
                  fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
