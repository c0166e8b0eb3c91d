"""The figures of `python -m bench.run` that carry from one machine to another."""

from __future__ import annotations


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
                round(row["images_per_second"] / fp32, 3)
    for name, row in results.get("serving", {}).get("rows", {}).items():
        for key in ("throughput_over_bare_forward", "p50_latency_over_bare_forward"):
            if key in row:
                found[f"serving.{name}.{key}"] = row[key]
    if "calibration_over_inference" in results.get("calibration", {}):
        found["calibration.calibration_over_inference"] = \
            results["calibration"]["calibration_over_inference"]
    return found
