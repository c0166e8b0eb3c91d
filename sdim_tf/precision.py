"""What this machine computes fast: bfloat16 only where the hardware does it natively.

Measured on 2-core AMD EPYCs, SDIM's training step in bfloat16: 1.3x faster than float32
with AVX512-BF16, 7x slower with AVX2 only (emulated). GPUs of compute capability 8.0+
(Ampere) have bf16 tensor cores. Native support is necessary, not sufficient (an Intel Xeon
with AVX512-BF16 and no AMX trained bf16 at 0.7x float32): `--mixed_precision=auto` measures
where it is native (sdim_tf.precision_probe). XLA (`jit_compile`) pays off on GPUs and was
slower on CPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

PRECISIONS = ("auto", "float32", "bfloat16")
JIT_COMPILE = ("auto", "on", "off")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}  # Keras dtype policies


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What `resolve` decides on: CPU flags and the GPUs' compute capabilities (and the CPU's
    model name, which names the machine a measurement holds for)."""

    cpu_flags: frozenset[str]
    gpu_capabilities: tuple[tuple[int, int], ...]
    cpu_model: str = ""

    @classmethod
    def detect(cls) -> Hardware:
        import tensorflow as tf

        capabilities = []
        for gpu in tf.config.list_physical_devices("GPU"):
            capability = tf.config.experimental.get_device_details(gpu).get(
                "compute_capability")
            capabilities.append(tuple(capability) if capability else (0, 0))
        return cls(cpu_flags(), tuple(capabilities), cpu_model())


def cpuinfo_field(keys: tuple[str, ...], cpuinfo: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key is one of `keys` (Linux); None
    where there is none or the file is not readable."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, colon, value = line.partition(":")
                if colon and key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is not readable."""
    return frozenset((cpuinfo_field(("flags", "Features"), cpuinfo) or "").split())


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux); "" where /proc/cpuinfo does not say."""
    return cpuinfo_field(("model name",), cpuinfo) or ""


@contextlib.contextmanager
def policy(name: str | None = None) -> Iterator[None]:
    """Keras' global dtype policy set to `name` (None: left as it is) for the block, and
    the one in force before restored after it."""
    import keras

    previous = keras.mixed_precision.global_policy()
    try:
        if name is not None:
            keras.mixed_precision.set_global_policy(name)
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def resolve(requested: str, hardware: Hardware) -> tuple[str, str]:
    """("float32" or "bfloat16", why) for --mixed_precision=`requested` by the hardware alone:
    auto is bfloat16 where it is native."""
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {requested!r}")
    if requested != "auto":
        return requested, f"--mixed_precision={requested}"
    if hardware.gpu_capabilities:
        slow = [c for c in hardware.gpu_capabilities if c < (8, 0)]
        if slow:
            return "float32", (f"auto: a GPU of compute capability {slow[0][0]}.{slow[0][1]} "
                               "(< 8.0) has no bf16 tensor cores")
        return "bfloat16", "auto: every GPU has compute capability >= 8.0 (bf16 tensor cores)"
    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & hardware.cpu_flags)
    if native:
        return "bfloat16", f"auto: the CPU does bf16 natively ({', '.join(native)})"
    return "float32", ("auto: the CPU lacks avx512_bf16 and amx_bf16, where bf16 is emulated "
                       "(7x slower than float32 on AVX2)")


def jit_compile(requested: str, hardware: Hardware) -> bool:
    """XLA on for --jit_compile=on, or auto with a GPU; off on CPUs, where it was slower."""
    if requested not in JIT_COMPILE:
        raise ValueError(f"jit_compile must be one of {', '.join(JIT_COMPILE)}, "
                         f"got {requested!r}")
    return requested == "on" or (requested == "auto" and bool(hardware.gpu_capabilities))
