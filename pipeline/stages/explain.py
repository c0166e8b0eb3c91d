"""Explain: why test and OOD images were accepted or rejected, and what the model learned.

Saliency, SmoothGrad and GradCAM++ maps (tf-keras-vis) of the predicted class's score
(the deployed one) for accepted test images, rejected test images and rejected OOD images; a
PCA picture of the representations z with the class means and OOD points; training curves.
Thresholds are those the export applies (calibrate's deployed percentile).
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from pipeline import artifacts, summary
from pipeline.run_dir import rejecting_classifier
from sdim_tf import data, explain, ood_data, plots

EXPLAIN_MD = "explain.md"
CURVES_PNG, REPRESENTATIONS_PNG = "training_curves.png", "representations.png"
GROUPS = {"accepted": "accepted test images", "rejected": "rejected test images",
          "ood": "rejected OOD images"}
PER_GROUP = 6
TEST_IMAGES, OOD_IMAGES = 2000, 500


def _caption(names, logits, threshold, label=None, reason="") -> str:
    c = int(np.argmax(logits))
    verdict = f"rejected ({reason})" if reason else "accepted"
    truth = "" if label is None else f" (true: {names[label]})"
    return f"{names[c]}{truth}\nscore {logits[c]:.1f} / thr {threshold[c]:.1f}\n{verdict}"


def run(config, stage_dir: pathlib.Path, upstream: dict) -> list[str]:
    examples, trained = upstream["ingest"], upstream["train"]
    dataset, seed = config.data.dataset, trained.seed
    names = examples.class_names
    deployable = rejecting_classifier(examples, trained, upstream["calibrate"])
    model = deployable.model
    percentile, thresholds = upstream["calibrate"].deployed()
    score = upstream["calibrate"].score.description
    images, labels = examples.arrays("test", limit=TEST_IMAGES)
    logits = model.predict(images, batch_size=500, verbose=0).astype(np.float64)
    rejected = deployable.decide(logits).rejected.numpy()

    sets, _ = ood_data.ood_sets(dataset, examples.image_shape, config.data.data_dir, seed)
    paired = [n for n in ood_data.OOD_PAIRS.get(dataset, []) if n in sets]
    ood_name = paired[0] if paired else "uniform_noise"
    ood = sets[ood_name][:OOD_IMAGES]
    ood = ood if ood.dtype == np.float32 else \
        data.preprocess(ood).numpy().astype(np.float32)
    ood_logits = model.predict(ood, batch_size=500, verbose=0).astype(np.float64)
    ood_rejected = deployable.decide(ood_logits).rejected.numpy()

    groups = {
        "accepted": (images, logits, labels, np.flatnonzero(~rejected)[:PER_GROUP]),
        "rejected": (images, logits, labels, np.flatnonzero(rejected)[:PER_GROUP]),
        "ood": (ood, ood_logits, None, np.flatnonzero(ood_rejected)[:PER_GROUP]),
    }
    view = explain.functional_view(model)
    block = explain.last_block_name(model)
    outputs, sections = [], []
    for group, (pool, pool_logits, pool_labels, chosen) in groups.items():
        title = GROUPS[group] if group != "ood" else f"rejected {ood_name} images"
        if len(chosen) == 0:
            sections.append(f"## {title}\n\nNone among the images looked at.\n")
            continue
        predicted = pool_logits[chosen].argmax(1)
        maps = {m: explain.attribution_maps(view, pool[chosen], predicted, m, block,
                                            seed=seed) for m in explain.METHODS}
        reasons = deployable.decide(pool_logits[chosen]).reasons().numpy()
        captions = [_caption(names, pool_logits[i], thresholds,
                             None if pool_labels is None else int(pool_labels[i]),
                             reason.decode()) for i, reason in zip(chosen, reasons,
                                                                   strict=True)]
        figure = f"maps_{group}.png"
        plots.attribution_grid(pool[chosen], maps, captions, stage_dir / figure,
                               title=f"{title}: maps of the predicted class's score")
        outputs.append(figure)
        sections.append(f"## {title}\n\n![{group}]({figure})\n")
        logging.info("explain: %s maps for %d images", title, len(chosen))

    z = explain.representations(model, images)
    ood_z = explain.representations(model, ood)
    project, ratios = explain.pca(z)
    # whatever the score, the classes' mean z over these test images
    means = project(np.stack([z[labels == c].mean(0) if (labels == c).any()
                              else np.full(z.shape[1], np.nan) for c in range(len(names))]))
    plots.representation_scatter(
        project(z), labels, names, stage_dir / REPRESENTATIONS_PNG, means=means,
        ood=project(ood_z), ood_name=ood_name,
        axis_labels=[f"PC {i + 1} ({100 * r:.1f}% of variance)" for i, r in enumerate(ratios)])
    rows = trained.history()
    plots.training_curves(rows, stage_dir / CURVES_PNG)
    outputs += [REPRESENTATIONS_PNG, CURVES_PNG]

    epochs = f"{len(rows)} epoch{'s' * (len(rows) != 1)}"
    trained_text = (f"{epochs}; the last: {summary.epoch_line(rows[-1], len(rows))}." if rows
                    else "No epoch: the untrained network (--epochs=0).")
    text = [f"# Explanations: {dataset} ({trained.kind})", "",
            f"Thresholds: {percentile} (what the export "
            f"applies). Of the first {len(images)} test images the rule rejects "
            f"{100 * rejected.mean():.1f}%; of {len(ood)} {ood_name} images "
            f"{100 * ood_rejected.mean():.1f}%.", "",
            f"Each map shows which pixels move the deployed score, {score}: Saliency "
            "(|gradient|), SmoothGrad (gradients averaged over noisy copies) and GradCAM++ "
            f"(on the last residual block, `{block}`), each scaled to [0, 1] per image.", "",
            *sections,
            "## Representations", "",
            f"PCA of z for {len(images)} test images (the two axes explain "
            f"{100 * ratios.sum():.1f}% of the variance), each class's mean z over these "
            f"images as a star, {len(ood)} {ood_name} images as black crosses.", "",
            f"![representations]({REPRESENTATIONS_PNG})", "",
            "## Training", "",
            trained_text + " Losses, the network's own accuracy (train, and test on the "
            "first 1000 test images) and the rejection watched each epoch on held-out images "
            "(history.csv):", "",
            f"![training curves]({CURVES_PNG})", ""]
    artifacts.write_text(stage_dir / EXPLAIN_MD, "\n".join(text))
    return [EXPLAIN_MD, *outputs]
