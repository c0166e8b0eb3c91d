"""The figures of `python -m bench.run` and `python -m bench.peer` that carry from one machine
to another: ratios of two measurements taken side by side."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3)


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over rounds of each round's ratio: each pairs two measurements taken next
    to each other, so load that drifts over the run cancels."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} rounds against {len(denominators)}")
    return round(float(np.median(np.divide(numerators, denominators))), 3)


def ratios(results: dict) -> dict:
    """The figures that carry from one machine to another: each a ratio of two measurements
    taken side by side in this run (bench.epoch_profile gives epoch / steps of a run)."""
    found = {}
    rows = results.get("training", {}).get("rows", {})
    for name, row in rows.items():
        if "step_time_over_discriminative" in row:
            found[f"training.step_time.{name}_over_discriminative"] = \
                row["step_time_over_discriminative"]
    for name, row in rows.items():
        if name.endswith("_mixed_bfloat16") and name.replace("mixed_bfloat16", "float32") in rows:
            fp32 = rows[name.replace("mixed_bfloat16", "float32")]["images_per_second"]
            found[f"training.images_per_second.{name.rsplit('_mixed', 1)[0]}.bf16_over_fp32"] = \
                ratio(row["images_per_second"], fp32)
    for name, row in results.get("serving", {}).get("rows", {}).items():
        for key in ("throughput_over_bare_forward", "p50_latency_over_bare_forward"):
            if key in row:
                found[f"serving.{name}.{key}"] = row[key]
    if "calibration_over_inference" in results.get("calibration", {}):
        found["calibration.calibration_over_inference"] = \
            results["calibration"]["calibration_over_inference"]
    return found


def ours_over_theirs(figures: dict) -> dict:
    """bench.peer's ratios, ours over theirs, each the median of the rounds' ratios:
    training images/s per precision and critic (above 1: ours trains faster), serving p50
    latency at batch 1 (below 1: ours answers sooner) and images/s at batch 256 (above 1:
    ours serves more); and the images/s per CPU second of each, for shared cores."""
    found = {}
    for precision, sides in figures["training"]["rows"].items():
        theirs = sides.get("theirs", {})
        for side, row in sides.items():
            for figure in ("images_per_second", "images_per_cpu_second"):
                if side.startswith("ours_") and figure in row and figure in theirs:
                    found[f"training.{precision}.{figure}.{side}_over_theirs"] = median_ratio(
                        row[figure]["per_round"], theirs[figure]["per_round"])
    rows = figures["serving"]["rows"]
    for side, row in rows.items():
        for figure in ("p50_ms_batch_1", "images_per_second_batch_256",
                       "images_per_cpu_second_batch_256"):
            if side.startswith("theirs_") and figure in row and figure in rows["ours"]:
                found[f"serving.{figure}.ours_over_{side}"] = median_ratio(
                    rows["ours"][figure]["per_round"], row[figure]["per_round"])
    return found
