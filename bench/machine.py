"""The machine a benchmark ran on: CPU model and the instruction sets that change TF's speed
and numerics (recorded beside every figure; times do not carry across machines)."""

from __future__ import annotations

import os
import pathlib
import platform

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def machine() -> dict:
    info = {"cores": os.cpu_count(), "platform": platform.platform(), "cpu": None, "flags": []}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["cpu"] is None:
            info["cpu"] = value.strip()
        if key.strip() == "flags":
            present = set(value.split())
            info["flags"] = [f for f in CPU_FLAGS if f in present]
            break
    return info


KINDS = ("gpu", "amx", "avx512_bf16", "avx512", "avx2", "other")


def kind(info: dict | None = None, gpus: int | None = None) -> str:
    """The machine kind results are kept under (bench/results/<kind>/): what decides speed
    and the default precision. `gpus`: visible GPUs (default: asked of TensorFlow)."""
    info = info or machine()
    if gpus is None:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
    flags = set(info["flags"])
    if gpus:
        return "gpu"
    for name, needed in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"),
                         ("avx512", "avx512f"), ("avx2", "avx2")):
        if needed in flags:
            return name
    return "other"


def results_path(name: str, out: str | os.PathLike | None = None) -> pathlib.Path:
    """Where a timing benchmark's JSON goes: <out or bench/results>/<kind>/<name>.json, so that
    the next machine's figures do not overwrite this one's."""
    return pathlib.Path(out or RESULTS) / kind() / f"{name}.json"
