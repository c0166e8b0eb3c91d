"""The machine a benchmark ran on: CPU model and the instruction sets that change TF's speed
and numerics (recorded beside every figure; times do not carry across machines)."""

from __future__ import annotations

import os
import pathlib
import platform

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
