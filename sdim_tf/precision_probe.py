"""--mixed_precision=auto by measurement: a few training steps of the run's own model in
float32 and in bfloat16, the faster kept, remembered per machine and step.

Native bf16 is necessary, not sufficient: on an Intel Xeon with AVX512-BF16 and no AMX the
SDIM step ran at 0.7x float32 in bfloat16, on AMD EPYCs with the same flag at 1.2-1.4x. Where
bf16 is not native (emulated, 7x slower on AVX2) nothing is measured: the hardware rule's
float32 stands (`sdim_tf.precision.resolve`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import statistics
import time
from collections.abc import Callable

from sdim_tf import precision, temporaries

PROBED = ("float32", "bfloat16")
# Untimed steps per precision: the first traces the step (and fills the shuffle buffer), the
# second still pays graph optimisation and oneDNN's first-use setup.
WARMUP_STEPS = 2
# Timed steps per precision, alternating, so that a neighbour's load falls on both alike. The
# precisions differed by 20-40% per step where the steps of one varied by a few percent; the
# median of 5 ignores 2 disturbed steps and costs about 3 s at batch 128 on a 2-core CPU.
TIMED_STEPS = 5
CACHE_ENV = "SDIM_CACHE_DIR"  # the cache folder; else $XDG_CACHE_HOME/sdim_tf, ~/.cache/sdim_tf
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Probe:
    """The timed steps' seconds in each precision at one global batch size."""

    step_seconds: dict[str, tuple[float, ...]]
    batch_size: int
    measured_at: str  # ISO 8601, UTC
    cache: str | None = None  # the cache file it was read from; None: measured by this run

    def images_per_second(self, name: str) -> float:
        """Global batch over the median step."""
        return self.batch_size / statistics.median(self.step_seconds[name])

    def choice(self) -> tuple[str, str]:
        """(the faster precision, why); float32 on a tie, as it rounds nothing."""
        speed = {name: self.images_per_second(name) for name in PROBED}
        chosen = "bfloat16" if speed["bfloat16"] > speed["float32"] else "float32"
        other = "float32" if chosen == "bfloat16" else "bfloat16"
        steps = min(len(s) for s in self.step_seconds.values())
        why = (f"auto: measured {speed[chosen]:.0f} img/s {chosen} vs {speed[other]:.0f} img/s "
               f"{other} over {steps} step{'s' if steps > 1 else ''}")
        return chosen, why + (f", cached in {self.cache}" if self.cache else "")

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "measured_at": self.measured_at,
                "cache": self.cache,
                **{name: {"images_per_second": round(self.images_per_second(name), 1),
                          "step_ms": [round(1000 * s, 3) for s in self.step_seconds[name]]}
                   for name in PROBED}}

    @classmethod
    def from_json(cls, record: dict, cache: str | None = None) -> Probe:
        """Raises KeyError, TypeError or ValueError on a record of another shape."""
        seconds = {name: tuple(float(ms) / 1000 for ms in record[name]["step_ms"])
                   for name in PROBED}
        if not all(seconds.values()) or any(s <= 0 for v in seconds.values() for s in v):
            raise ValueError("step times missing or not positive")
        return cls(seconds, int(record["batch_size"]), str(record["measured_at"]), cache)


def measure(make_step: Callable[[str], Callable[[], object]], batch_size: int,
            clock: Callable[[], float] = time.perf_counter) -> Probe:
    """Times `make_step(name)()` for each precision in PROBED; `make_step` builds the run's
    model and step while that precision's Keras policy is global, and its result runs one
    training step and waits for it. The global policy in force before is restored."""
    steps, seconds = {}, {name: [] for name in PROBED}
    for name in PROBED:
        with precision.policy(precision.POLICIES[name]):
            steps[name] = make_step(name)
            for _ in range(WARMUP_STEPS):
                steps[name]()
    for _ in range(TIMED_STEPS):
        for name in PROBED:
            with precision.policy(precision.POLICIES[name]):
                started = clock()
                steps[name]()
                seconds[name].append(clock() - started)
    return Probe({k: tuple(v) for k, v in seconds.items()}, batch_size,
                 datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def resolve(requested: str, hardware: precision.Hardware, measure: Callable[[], Probe],
            unmeasured: str | None = None, warn: Callable[[str], object] = print
            ) -> tuple[str, str, Probe | None]:
    """(precision, why, the probe or None) for --mixed_precision=`requested`: auto measures
    (`measure`) where the hardware has native bf16, unless `unmeasured` says why not; a
    failed measurement falls back to the hardware rule, with its cause in the reason."""
    chosen, why = precision.resolve(requested, hardware)
    if requested != "auto":
        return chosen, why, None
    if chosen == "float32":  # no native bf16 (emulated) or a GPU without bf16 tensor cores
        return chosen, f"{why}; not measured", None
    if unmeasured:
        return chosen, f"{why}; not measured: {unmeasured}", None
    try:
        probe = measure()
    except Exception as error:  # any failure of the probe: the run itself goes on
        cause = (str(error).strip().splitlines() or [""])[0][:200]
        warn(f"the precision probe failed ({type(error).__name__}: {cause}); deciding by "
             "the hardware")
        return chosen, (f"auto: the speed probe failed ({type(error).__name__}: {cause}), "
                        f"so by the hardware: {why.removeprefix('auto: ')}"), None
    return (*probe.choice(), probe)


def cache_dir() -> pathlib.Path:
    """$SDIM_CACHE_DIR, else $XDG_CACHE_HOME/sdim_tf, else ~/.cache/sdim_tf."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "sdim_tf"


def machine_key(hardware: precision.Hardware) -> dict:
    """What makes one machine's measurement hold on another: CPU, cores, GPUs, TensorFlow."""
    import tensorflow as tf

    return {"cpu": hardware.cpu_model, "cpu_flags": " ".join(sorted(hardware.cpu_flags)),
            "cores": os.cpu_count(), "gpus": [list(c) for c in hardware.gpu_capabilities],
            "tensorflow": tf.__version__}


@dataclasses.dataclass(frozen=True)
class ProbeCache:
    """One small JSON file per key (machine and step settings) under `folder`."""

    folder: pathlib.Path

    def path(self, key: dict) -> pathlib.Path:
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]
        return pathlib.Path(self.folder) / "precision_probe" / f"{digest}.json"

    def read(self, key: dict) -> Probe | None:
        """The probe stored under `key`, None when there is none; ValueError names what is
        wrong with a file that is there but unreadable or of another key."""
        path = self.path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: {error}") from error
        try:
            if record["version"] != CACHE_VERSION or _canonical(record["key"]) != _canonical(key):
                raise ValueError("written for another version or key")
            return Probe.from_json(record["probe"], cache=str(path))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a precision probe record ({error!r})") from error

    def write(self, key: dict, probe: Probe) -> pathlib.Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"version": CACHE_VERSION, "key": key, "probe": probe.to_json()}
        temporaries.replace_atomically(
            path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
        return path


def cached(cache: ProbeCache, key: dict, measure: Callable[[], Probe],
           warn: Callable[[str], object] = print) -> Probe:
    """The probe `cache` holds for `key`, else `measure()`'s, stored there. A file that
    cannot be read or written costs a warning (`warn`), never the run."""
    try:
        found = cache.read(key)
    except ValueError as error:
        warn(f"ignoring the precision probe cache: {error}")
        found = None
    if found is not None:
        return found
    probe = measure()
    try:
        cache.write(key, probe)
    except OSError as error:
        warn(f"could not cache the precision probe in {cache.path(key)}: {error}")
    return probe


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
