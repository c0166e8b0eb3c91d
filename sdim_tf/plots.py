"""Matplotlib figures (headless): class-conditional histograms with thresholds."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def class_histograms(in_scores: np.ndarray, in_labels: np.ndarray, ood_scores: np.ndarray,
                     thresholds: Sequence[float], class_names: Sequence[str],
                     path: str | os.PathLike, ood_name: str = "OOD",
                     score_name: str = "log p(x | y=c)",
                     threshold_name: str = "threshold") -> None:
    """Paper Figure 2 style: per class c, the class-c score (`score_name`, the paper's
    log p(x|c) by default) of test samples of class c, of the OOD samples, and the threshold
    delta_c (`threshold_name` in the legend)."""
    num = len(class_names)
    cols = min(5, num)
    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for c, ax in enumerate(axes.flat):
        if c >= num:
            ax.axis("off")
            continue
        inside = in_scores[in_labels == c, c]
        outside = ood_scores[:, c]
        low = np.percentile(np.concatenate([inside, outside]), 1)
        high = max(inside.max(initial=-np.inf), outside.max(initial=-np.inf))
        bins = np.linspace(low, high, 40)
        ax.hist(np.clip(inside, low, None), bins, alpha=0.6, density=True, label="in (test)")
        ax.hist(np.clip(outside, low, None), bins, alpha=0.6, density=True, label=ood_name)
        if np.isfinite(thresholds[c]):
            ax.axvline(thresholds[c], color="k", linestyle="--", linewidth=1,
                       label=threshold_name)
        ax.set_title(f"{c}: {class_names[c]}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel(f"{score_name}  (values below the 1st percentile of the plot are clipped)",
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
        _percent_panel(ax, "epsilon", "accuracy (%)", 8)
    _save(fig, path)


def undetected_curves(panels: dict, path: str | os.PathLike) -> None:
    """Undetected success (adversarial examples wrong and accepted) against the budget, one
    panel per norm. `panels` maps title -> {label: (epsilons, shares)}."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=True):
        for label, (epsilons, shares) in lines.items():
            ax.plot(epsilons, [np.nan if v is None else 100 * v for v in shares], marker="o",
                    markersize=3, label=label)
        ax.set_title(f"undetected success, {title}", fontsize=10)
        _percent_panel(ax, f"epsilon ({title}, images in [0, 1])", "wrong and accepted (%)", 7)
    _save(fig, path)


def _percent_panel(ax, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(fig, path: str | os.PathLike) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], path: str | os.PathLike,
               columns: int = 5, title: str | None = None) -> None:
    """Images in [0, 1] ([H, W, 1] or [H, W, 3]) with a caption under each."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.9 * rows), squeeze=False)
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


def attribution_grid(images: np.ndarray, maps: dict, captions: Sequence[str],
                     path: str | os.PathLike, title: str | None = None) -> None:
    """One row per image: the image, then each method's map laid over it."""
    rows, columns = len(images), 1 + len(maps)
    fig, axes = plt.subplots(max(rows, 1), columns, figsize=(1.9 * columns, 2.0 * max(rows, 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r in range(rows):
        gray = np.clip(np.asarray(images[r], np.float32), 0, 1).mean(-1)
        axes[r, 0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(captions[r], fontsize=6)
        for c, (method, values) in enumerate(maps.items(), start=1):
            axes[r, c].imshow(gray, cmap="gray", vmin=0, vmax=1)
            axes[r, c].imshow(values[r], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(method, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def contact_sheet(images: np.ndarray, maps: np.ndarray, captions: Sequence[str],
                  path: str | os.PathLike, per_row: int = 4) -> None:
    """Images with their maps laid over a copy beside them, `per_row` pairs per row, each
    pair captioned."""
    rows = max(1, -(-len(images) // per_row))
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(1.6 * 2 * per_row, 1.9 * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, values, caption) in enumerate(zip(images, maps, captions, strict=True)):
        gray = np.clip(np.asarray(image, np.float32), 0, 1).mean(-1)
        left, right = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row,
                                                                   2 * (i % per_row) + 1]
        left.imshow(gray, cmap="gray", vmin=0, vmax=1)
        left.set_title(caption, fontsize=6, loc="left")
        right.imshow(gray, cmap="gray", vmin=0, vmax=1)
        right.imshow(values, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def representation_scatter(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                            path: str | os.PathLike, means: np.ndarray | None = None,
                            ood: np.ndarray | None = None, ood_name: str = "OOD",
                            axis_labels: Sequence[str] = ("PC 1", "PC 2")) -> None:
    """2-D representations coloured by class, class means as stars, OOD points in black."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(class_names):
        chosen = points[labels == c]
        ax.scatter(chosen[:, 0], chosen[:, 1], s=4, alpha=0.5, color=cmap(c % 10), label=name)
    if means is not None:
        ax.scatter(means[:, 0], means[:, 1], s=160, marker="*", edgecolor="k",
                   color=[cmap(c % 10) for c in range(len(means))], label="class means")
    if ood is not None and len(ood):
        ax.scatter(ood[:, 0], ood[:, 1], s=4, alpha=0.5, color="k", marker="x", label=ood_name)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def training_curves(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss terms, train/test accuracy and, where history.csv has them, the per-epoch
    rejection quality ("monitor/<score>/mean_outlier_rejected" and "..._auroc"), per epoch."""
    epochs = [r["epoch"] for r in rows]
    watched = sorted({k.rsplit("/", 1)[0] for r in rows for k in r
                      if k.startswith("monitor/") and k.endswith("/mean_outlier_auroc")})
    fig, axes = plt.subplots(1, 3 if watched else 2, figsize=(13.5 if watched else 9.0, 3.4))
    left, right = axes[0], axes[1]
    for key in ("loss", "mi_loss", "nll_loss", "lm_loss"):
        if rows and key in rows[0]:
            left.plot(epochs, [r[key] for r in rows], marker="o", markersize=3, label=key)
    left.set_xlabel("epoch")
    left.set_title("training losses", fontsize=10)
    left.legend(fontsize=8)
    for key in ("accuracy", "test_accuracy"):
        if rows and key in rows[0]:
            right.plot(epochs, [100 * r[key] for r in rows], marker="o", markersize=3,
                       label=key.replace("accuracy", "acc.").replace("_", " "))
    right.set_xlabel("epoch")
    right.set_ylabel("%")
    right.set_title("accuracy", fontsize=10)
    right.legend(fontsize=8)
    for prefix in watched:
        score = prefix.removeprefix("monitor/")
        for figure, style in (("mean_outlier_rejected", "-"), ("mean_outlier_auroc", "--")):
            kept = [r for r in rows if f"{prefix}/{figure}" in r]
            axes[2].plot([r["epoch"] for r in kept], [100 * r[f"{prefix}/{figure}"] for r in kept],
                         style, marker="o", markersize=3,
                         label=f"{score}: {figure.replace('mean_outlier_', 'outliers ')}")
    if watched:
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("%")
        axes[2].set_title("rejection of held-out outliers (at the reject budget)", fontsize=10)
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def risk_coverage(curves: dict, path: str | os.PathLike, points: dict | None = None,
                  title: str | None = None) -> None:
    """Risk (errors among the accepted) against coverage, one line per image set; `points`
    ({label: (coverage, risk)}) marks chosen operating points."""
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, curve in curves.items():
        ax.plot(100 * np.asarray(curve["coverage"]), 100 * np.asarray(curve["risk"]),
                marker="o", markersize=3, label=name.replace("_", " "))
    for label, (coverage, risk) in (points or {}).items():
        ax.plot([100 * coverage], [100 * risk], marker="*", markersize=12, linestyle="none",
                label=label)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xlabel("coverage (% accepted, best scores first)")
    ax.set_ylabel("risk (% wrong among accepted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
