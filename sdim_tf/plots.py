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


def accuracy_curves(epsilons: Sequence[float], curves: dict, path: str | os.PathLike) -> None:
    """Paper Figures 4 and 5: accuracy against the L-inf budget, one panel per attack.

    `curves` maps attack -> {model name: accuracies}."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (attack, by_model) in zip(axes.flat, curves.items(), strict=True):
        for name, accuracies in by_model.items():
            ax.plot(epsilons, 100 * np.asarray(accuracies), marker="o", markersize=3, label=name)
        ax.set_title(attack.upper() + r"-$L_\infty$", fontsize=10)
        ax.set_xlabel("epsilon")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], path: str | os.PathLike,
               columns: int = 5, title: str | None = None) -> None:
    """Images in [0, 1] ([H, W, 1] or [H, W, 3]) with a caption under each."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        image = np.clip(np.asarray(image, np.float32), 0, 1)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
