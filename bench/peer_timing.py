"""sdim-tf beside the authors' PyTorch SDIM (bench.peer): the client of bench/peer_driver.py,
the interleaved rounds and the figures made of them. Flag-free, so that tests import it."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import tempfile

import keras
import numpy as np
import tensorflow as tf

from bench import machine, timing, untrained
from pipeline import deployed
from pipeline.sections import ConfigError
from sdim_tf import mutual_info
from sdim_tf.precision import POLICIES

DRIVER = pathlib.Path(__file__).with_name("peer_driver.py")
PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What each side runs: the same for both (bench.peer's flags)."""

    precisions: tuple[str, ...] = PRECISIONS
    critics: tuple[str, ...] = ("concat", "dot")
    rounds: int = 2
    steps: int = 20
    warmup: int = 5
    batch_size: int = 128
    latency_calls: int = 200
    throughput_calls: int = 20
    serving_warmup: int = 5

    def check(self) -> None:
        for name in ("rounds", "steps", "warmup", "batch_size", "latency_calls",
                     "throughput_calls", "serving_warmup"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name, known in (("precisions", PRECISIONS), ("critics", tuple(mutual_info.CRITICS))):
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown or not getattr(self, name):
                raise ConfigError(f"--{name}: {f'unknown {unknown}' if unknown else 'none given'}"
                                  f"; known: {', '.join(known)}")


class Peer:
    """A process speaking bench/peer_driver.py's protocol. Its refusals and deaths raise
    ConfigError with one line."""

    def __init__(self, command: list[str]):
        self.command = command
        self.stderr = tempfile.TemporaryFile("w+")
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=self.stderr,
                                            text=True)
        except OSError as e:
            raise ConfigError(f"--peer_python={command[0]} does not run: {e.strerror}") from None
        self.info = self._reply("start")["ready"]

    def request(self, op: str, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _reply says how
        return self._reply(op)

    def _reply(self, what: str) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.stderr.seek(0)
            last = (self.stderr.read().strip().splitlines() or ["(nothing on stderr)"])[-1]
            raise ConfigError(f"the peer driver ({self.command[0]}) exited with code {code} "
                              f"at {what}: {last}")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"the peer driver ({self.command[0]}) answered {what} with "
                              f"{line.strip()[:200]!r}, not JSON") from None
        if "error" in reply:
            raise ConfigError(reply["error"])
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.stderr.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def driver_command(python: str, peer_dir: str, model) -> list[str]:
    """The driver under `python` (isolated: no PYTHONPATH, no script folder on sys.path),
    building their SDIM of our `model` config's size."""
    return [python, "-I", str(DRIVER), f"--peer_dir={peer_dir}", f"--n={model.n}",
            f"--rep_dim={model.rep_dim}", f"--margin={model.margin}",
            f"--alpha={model.alpha}", f"--beta={model.beta}", f"--gamma={model.gamma}"]


def train_gflop_per_image(n: int, filters, head_units: int, rep_dim: int, size: int = 32,
                          channels: int = 1) -> float:
    """GFLOP of one image's training step in the encoder's convolutions and dense layers:
    3 x forward (backward: the gradients of inputs and of weights, each as costly) x 2 FLOP
    per multiply-add. The critic, losses, batch norm and optimizer are left out (the share of
    peak it gives is a lower bound)."""
    macs = size * size * channels * filters[0] * 9  # stem
    inputs = filters[0]
    for stage, width in enumerate(filters):
        side = size >> stage  # stages 2-4 halve the map in their first block
        macs += side * side * 9 * (inputs * width + width * width)  # first block
        macs += (n - 1) * side * side * 9 * 2 * width * width
        inputs = width
    macs += filters[-1] * head_units + head_units * rep_dim
    return 3 * 2 * macs / 1e9


def flop_share(images_per_second: float, gflop_per_image: float, peak_gflops: float) -> float:
    return round(images_per_second * gflop_per_image / peak_gflops, 4)


def _add(row: dict, figure: str, value: float) -> None:
    row.setdefault(figure, {"per_round": []})["per_round"].append(value)


def medians(rows: dict) -> None:
    for row in rows.values():
        for figure in row.values():
            if isinstance(figure, dict) and "per_round" in figure:
                figure["median"] = round(float(np.median(figure["per_round"])), 3)


def _our_training(critic: str, precision: str, dataset, warmup: int):
    """Our step, built and traced (warm-up) under the precision's Keras policy."""
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        return timing.training_steps(untrained.model("sdim", critic), dataset, warmup)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def our_serving(model_dir: str | None, tmp: pathlib.Path):
    """(call of images, SavedModel path): serving_default by keyword, as the README shows, of
    the newest version in `model_dir`, or of an untrained export made in `tmp`."""
    path = deployed.version_dir(model_dir) if model_dir else \
        untrained.export(tmp / "saved_models", "peer")[0]
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]
    return (lambda images: signature(images=images)), str(path)


def _record(row: dict, suffix: str, figure: str, value: float, cpu: float, wall: float,
            images: int | None = None) -> None:
    """`figure`, the cores the side used, and with `images` its images per CPU second (what
    a side would do on cores of its own, were it to scale: a figure for shared cores)."""
    _add(row, figure, value)
    _add(row, f"cores_used{suffix}", timing.cores_used(cpu, wall))
    if images:
        _add(row, f"images_per_cpu_second{suffix}", timing.images_per_second(images, cpu))


def train_round(settings: Settings, peer: Peer, ours: dict, rows: dict, dataset,
                first: bool) -> None:
    """One round of training rows: ours for each critic, then theirs, per precision."""
    images = settings.steps * settings.batch_size
    for precision in settings.precisions:
        for critic in settings.critics:
            if (critic, precision) not in ours:
                ours[critic, precision] = _our_training(critic, precision, dataset,
                                                       settings.warmup)
            with timing.cpu_and_wall() as times:
                seconds = ours[critic, precision](settings.steps)
            _record(rows[precision].setdefault(f"ours_{critic}", {}), "", "images_per_second",
                    timing.images_per_second(images, seconds), times["cpu"], times["wall"],
                    images)
        theirs = rows[precision].setdefault("theirs", {})
        if "unavailable" not in theirs:
            reply = peer.request("train", precision=precision, batch_size=settings.batch_size,
                                 warmup=settings.warmup if first else 0, steps=settings.steps)
            if "unavailable" in reply:
                theirs["unavailable"] = reply["unavailable"]
            else:
                _record(theirs, "", "images_per_second",
                        timing.images_per_second(images, reply["seconds"]),
                        reply["cpu_seconds"], reply["wall_seconds"], images)


def serve_round(settings: Settings, peer: Peer, serve, images, rows: dict,
                first: bool) -> None:
    """One round of serving rows, batch 1 (latency) then 256 (throughput): ours, then theirs
    per precision."""
    for size, calls in ((1, settings.latency_calls), (256, settings.throughput_calls)):
        warmup = settings.serving_warmup if first else 0
        timing.call_seconds(serve, images[:size], warmup)
        with timing.cpu_and_wall() as times:
            seconds = timing.call_seconds(serve, images[:size], calls)
        answers = {"ours": (seconds, times["cpu"], times["wall"])}
        for precision in settings.precisions:
            name = f"theirs_{precision}"
            if "unavailable" not in rows[name]:
                reply = peer.request("serve", precision=precision, batch_size=size,
                                     warmup=warmup, calls=calls)
                if "unavailable" in reply:
                    rows[name]["unavailable"] = reply["unavailable"]
                else:
                    answers[name] = (reply["seconds"], reply["cpu_seconds"],
                                     reply["wall_seconds"])
        for name, (seconds, cpu, wall) in answers.items():
            if size == 1:
                _record(rows[name], "_batch_1", "p50_ms_batch_1",
                        timing.percentile_ms(seconds, 50), cpu, wall)
                _add(rows[name], "p99_ms_batch_1", timing.percentile_ms(seconds, 99))
            else:
                _record(rows[name], "_batch_256", "images_per_second_batch_256",
                        timing.images_per_second(size * calls, sum(seconds)), cpu, wall,
                        size * calls)


def measure(settings: Settings, peer: Peer, serve, path: str) -> dict:
    """Every round's rows (ours, then theirs, per figure) and their medians; `serve`: our
    serving call of the SavedModel at `path`."""
    dataset = timing.random_batches(settings.batch_size)
    images = tf.constant(np.random.default_rng(0).random((256, 32, 32, 1), np.float32))
    training = {precision: {} for precision in settings.precisions}
    serving = {"ours": {"model": path, "precision": "float32 (as exported)"},
               **{f"theirs_{precision}": {} for precision in settings.precisions}}
    ours = {}
    for round_ in range(settings.rounds):
        train_round(settings, peer, ours, training, dataset, round_ == 0)
        print(f"round {round_ + 1}, training: {json.dumps(training)}", flush=True)
        serve_round(settings, peer, serve, images, serving, round_ == 0)
        print(f"round {round_ + 1}, serving: {json.dumps(serving)}", flush=True)
    for rows in (*training.values(), serving):
        medians(rows)
    return {"training": {"rows": training}, "serving": {"rows": serving}}


def flop_shares(figures: dict, model) -> dict:
    """Adds each training row's share of peak; returns how the shares were reckoned."""
    info = machine.machine()
    ghz = machine.clock_ghz()
    encoder = model.encoder
    gflop = train_gflop_per_image(encoder.n, encoder.filters, encoder.head_units,
                                  encoder.rep_dim)
    peaks = {p: machine.peak_gflops(info["flags"], info["cores"], ghz, p)
             for p in figures["training"]["rows"]} if ghz else {}
    for precision, rows in figures["training"]["rows"].items():
        for row in rows.values():
            if peaks and "images_per_second" in row:
                row["peak_flop_share"] = flop_share(row["images_per_second"]["median"], gflop,
                                                    peaks[precision]["gflops"])
    return {"gflop_per_trained_image": round(gflop, 4), "peak": peaks, "assumptions": (
        "work: the encoder's convolutions and dense layers (ResNet, 32 x 32 x 1 input), 3 x "
        "forward x 2 FLOP per multiply-add; the critic, losses, batch norm and optimizer are "
        "not counted, so the share is a lower bound. Peak: cores (os.cpu_count(), vCPUs on a "
        "VM) x the clock /proc/cpuinfo reports (no turbo) x FLOP per cycle and core of the "
        "widest unit the flags show, two FMA units per core assumed (bench/machine.py: "
        "float32 64 with AVX-512, 32 with AVX2; bfloat16 1024 with AMX, 128 with "
        "AVX512-BF16).")}


