"""The machine a benchmark ran on: CPU model and the instruction sets that change TF's speed
and numerics (recorded beside every figure; times do not carry across machines)."""

from __future__ import annotations

import os
import pathlib
import platform

from sdim_tf import precision

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def machine() -> dict:
    present = precision.cpu_flags()
    return {"cores": os.cpu_count(), "platform": platform.platform(),
            "cpu": precision.cpu_model() or None,
            "flags": [f for f in CPU_FLAGS if f in present]}


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


# FLOP per cycle and core of the widest unit the flags show, by precision, assuming two FMA
# units per core (Intel Xeon; AMD Zen 4 runs AVX-512 on 256-bit halves: half of this).
# float32: 2 units x 16 lanes (AVX-512) or 8 (AVX2) x 2 FLOP per FMA. bfloat16: AMX's tile
# unit 1024 FLOP per cycle; AVX512-BF16's dot product twice float32's rate; emulated bf16
# (neither flag) computes no faster than float32.
FLOP_PER_CYCLE = {
    "float32": (("avx512f", 64), ("avx2", 32)),
    "bfloat16": (("amx_bf16", 1024), ("avx512_bf16", 128), ("avx512f", 64), ("avx2", 32)),
}
FLOP_PER_CYCLE_SCALAR = 4  # SSE: no FMA, 4 lanes


def clock_ghz(cpuinfo: str = "/proc/cpuinfo") -> float | None:
    """The first CPU's clock as /proc/cpuinfo reports it ("cpu MHz"; a VM's nominal clock,
    without turbo), in GHz; None where it is not reported."""
    mhz = precision.cpuinfo_field(("cpu MHz",), cpuinfo)
    return float(mhz) / 1000 if mhz else None


def peak_gflops(flags, cores: int, ghz: float, precision: str) -> dict:
    """The CPU's peak arithmetic rate for `precision` ("float32" or "bfloat16"): cores x GHz
    x FLOP per cycle and core (FLOP_PER_CYCLE), with the unit it assumes."""
    unit, per_cycle = next(((f, n) for f, n in FLOP_PER_CYCLE[precision] if f in flags),
                           ("sse", FLOP_PER_CYCLE_SCALAR))
    return {"gflops": round(cores * ghz * per_cycle, 1), "cores": cores, "ghz": ghz,
            "unit": unit, "flop_per_cycle_per_core": per_cycle}
