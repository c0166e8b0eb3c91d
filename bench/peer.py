"""`python -m bench.peer --peer_dir=DIR`: sdim-tf beside the authors' PyTorch SDIM, timed in
interleaved rounds on this machine (a benchmark, not a test).

    python -m bench.peer --peer_dir=robust-generative-classifier \
        --peer_python=PYTHON_WITH_TORCH [--rounds=2]

Their code (a checkout of github.com/p3i0t/robust-generative-classifier in DIR) runs in a
process of --peer_python (default: this python), where bench/peer_driver.py imports it and
answers JSON lines; ours runs in this process. Both: the paper's SDIM for 32 x 32 grey images
(ResNet10, d = 64, 256-unit critic, K = 10, alpha = beta = gamma = 1, Adam 1e-3) on random
32 x 32 x 1 images; float32, and bfloat16 (ours: Keras' mixed_bfloat16; theirs:
torch.autocast). Each round times ours, then theirs, for every figure: training images/s at
--batch_size after warm-up; serving p50 latency at batch 1 and images/s at batch 256 (ours: the
SavedModel's serving_default signature, loaded with tf.saved_model.load; theirs: their
forward and class scoring with rejection, under torch.no_grad). Writes
bench/results/<machine kind>/peer.json: every round's figures, their medians, the ratios ours
over theirs (bench/ratios.py) and the share of the CPU's peak FLOP/s each training row uses.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from bench import machine, ratios, timing, untrained
from pipeline import artifacts, deployed
from pipeline.sections import ConfigError
from sdim_tf import mutual_info
from sdim_tf.precision import POLICIES

DRIVER = pathlib.Path(__file__).with_name("peer_driver.py")
PRECISIONS = ("float32", "bfloat16")

flags.DEFINE_string("peer_dir", None, "A checkout of github.com/p3i0t/robust-generative-"
                    "classifier (their sdim.py, resnet.py, mi_networks.py, losses/).")
flags.DEFINE_string("peer_python", sys.executable, "A python with torch (and numpy) that "
                    "runs their code (default: this one; sdim-tf's [peer] extra).")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds (each: ours, then theirs, per figure).")
flags.DEFINE_integer("steps", 20, "Timed training steps per row and round.")
flags.DEFINE_integer("warmup", 5, "Untimed training steps per row, before the first round.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_list("precisions", list(PRECISIONS), f"Among {', '.join(PRECISIONS)}.")
flags.DEFINE_list("critics", ["concat", "dot"], "Our critics to train (concat: ours by "
                  "default, the paper's 4x4 map; dot: the authors' code's, 16x16 map).")
flags.DEFINE_integer("latency_calls", 200, "Timed batch-1 serving calls per row and round.")
flags.DEFINE_integer("throughput_calls", 20, "Timed batch-256 serving calls per row and round.")
flags.DEFINE_integer("serving_warmup", 5, "Untimed serving calls per row and batch size.")
flags.DEFINE_string("model_dir", None, "Our SavedModel to serve (a folder of versions, the "
                    "newest used; 1-channel images); default: an untrained export of the "
                    "default configuration, made in a temporary folder.")
flags.DEFINE_string("out", str(machine.RESULTS), "Where the JSON goes (a folder per machine "
                    "kind under it).")
FLAGS = flags.FLAGS


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


def _medians(rows: dict) -> None:
    for row in rows.values():
        for figure in row.values():
            if isinstance(figure, dict) and "per_round" in figure:
                figure["median"] = round(float(np.median(figure["per_round"])), 3)


def _check_flags() -> None:
    for name in ("rounds", "steps", "warmup", "batch_size", "latency_calls",
                 "throughput_calls", "serving_warmup"):
        if getattr(FLAGS, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    for name, known in (("precisions", PRECISIONS), ("critics", tuple(mutual_info.CRITICS))):
        unknown = sorted(set(getattr(FLAGS, name)) - set(known))
        if unknown:
            raise ConfigError(f"--{name}: unknown {unknown}; known: {', '.join(known)}")


def _our_training(critic: str, precision: str, dataset):
    """Our step, built and traced (warm-up) under the precision's Keras policy."""
    keras.mixed_precision.set_global_policy(POLICIES[precision])
    try:
        return timing.training_steps(untrained.model("sdim", critic), dataset, FLAGS.warmup)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _our_serving(tmp: pathlib.Path):
    """(call of images, SavedModel path): serving_default by keyword, as the README shows."""
    path = deployed.version_dir(FLAGS.model_dir) if FLAGS.model_dir else \
        untrained.export(tmp / "saved_models", "peer")[0]
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]
    return (lambda images: signature(images=images)), str(path)


def _record(row: dict, suffix: str, figure: str, value: float, cpu: float, wall: float):
    _add(row, figure, value)
    _add(row, f"cores_used{suffix}", timing.cores_used(cpu, wall))


def _train_round(peer: Peer, ours: dict, rows: dict, dataset, first: bool) -> None:
    """One round of training rows: ours for each critic, then theirs, per precision."""
    images = FLAGS.steps * FLAGS.batch_size
    for precision in FLAGS.precisions:
        for critic in FLAGS.critics:
            if (critic, precision) not in ours:
                ours[critic, precision] = _our_training(critic, precision, dataset)
            with timing.cpu_and_wall() as times:
                seconds = ours[critic, precision](FLAGS.steps)
            _record(rows[precision].setdefault(f"ours_{critic}", {}), "", "images_per_second",
                    timing.images_per_second(images, seconds), times["cpu"], times["wall"])
        theirs = rows[precision].setdefault("theirs", {})
        if "unavailable" not in theirs:
            reply = peer.request("train", precision=precision, batch_size=FLAGS.batch_size,
                                 warmup=FLAGS.warmup if first else 0, steps=FLAGS.steps)
            if "unavailable" in reply:
                theirs["unavailable"] = reply["unavailable"]
            else:
                _record(theirs, "", "images_per_second",
                        timing.images_per_second(images, reply["seconds"]),
                        reply["cpu_seconds"], reply["wall_seconds"])


def _serve_round(peer: Peer, serve, images, rows: dict, first: bool) -> None:
    """One round of serving rows, batch 1 (latency) then 256 (throughput): ours, then theirs
    per precision."""
    for size, calls in ((1, FLAGS.latency_calls), (256, FLAGS.throughput_calls)):
        warmup = FLAGS.serving_warmup if first else 0
        timing.call_seconds(serve, images[:size], warmup)
        with timing.cpu_and_wall() as times:
            seconds = timing.call_seconds(serve, images[:size], calls)
        answers = {"ours": (seconds, times["cpu"], times["wall"])}
        for precision in FLAGS.precisions:
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
                        timing.images_per_second(size * calls, sum(seconds)), cpu, wall)


def measure(peer: Peer, tmp: pathlib.Path) -> dict:
    """Every round's rows (ours, then theirs, per figure) and their medians."""
    dataset = timing.random_batches(FLAGS.batch_size)
    serve, path = _our_serving(tmp)
    images = tf.constant(np.random.default_rng(0).random((256, 32, 32, 1), np.float32))
    training = {precision: {} for precision in FLAGS.precisions}
    serving = {"ours": {"model": path, "precision": "float32 (as exported)"},
               **{f"theirs_{precision}": {} for precision in FLAGS.precisions}}
    ours = {}
    for round_ in range(FLAGS.rounds):
        _train_round(peer, ours, training, dataset, round_ == 0)
        print(f"round {round_ + 1}, training: {json.dumps(training)}", flush=True)
        _serve_round(peer, serve, images, serving, round_ == 0)
        print(f"round {round_ + 1}, serving: {json.dumps(serving)}", flush=True)
    for rows in (*training.values(), serving):
        _medians(rows)
    return {"training": {"rows": training}, "serving": {"rows": serving}}


def flop_shares(figures: dict, model) -> dict:
    """Adds each training row's share of peak; returns how the shares were reckoned."""
    info = machine.machine()
    ghz = machine.clock_ghz()
    encoder = model.encoder
    gflop = train_gflop_per_image(encoder.n, encoder.filters, encoder.head_units,
                                  encoder.rep_dim)
    peaks = {p: machine.peak_gflops(info["flags"], info["cores"], ghz, p)
             for p in FLAGS.precisions} if ghz else {}
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


def main(argv):
    del argv
    try:
        if not FLAGS.peer_dir:
            raise ConfigError("--peer_dir is required: a checkout of "
                              "github.com/p3i0t/robust-generative-classifier")
        _check_flags()
        config = untrained.config("sdim", FLAGS.critics[0])
        with Peer(driver_command(FLAGS.peer_python, FLAGS.peer_dir, config.model)) as peer, \
                tempfile.TemporaryDirectory(prefix="sdim-peer-") as tmp:
            figures = measure(peer, pathlib.Path(tmp))
            figures["peer"] = {"dir": str(pathlib.Path(FLAGS.peer_dir).resolve()),
                               "python": FLAGS.peer_python, **peer.info}
    except (ConfigError, deployed.DeployedModelError) as e:
        sys.exit(f"error: {e}")
    models = {critic: untrained.model("sdim", critic) for critic in FLAGS.critics}
    threads = tf.config.threading
    figures["ours"] = {
        "parameters": {critic: model.count_params() for critic, model in models.items()},
        "threads": {"intra_op": threads.get_intra_op_parallelism_threads(),
                    "inter_op": threads.get_inter_op_parallelism_threads()}}
    figures["settings"] = {
        "data": "random 32 x 32 x 1 images in [0, 1), labels 0-9",
        "batch_size": FLAGS.batch_size,
        "rounds": FLAGS.rounds, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
        "latency_calls": FLAGS.latency_calls, "throughput_calls": FLAGS.throughput_calls,
        "serving_warmup": FLAGS.serving_warmup}
    figures["peak_flop_share"] = flop_shares(figures, models[FLAGS.critics[0]])
    figures["ratios"] = ratios.ours_over_theirs(figures)
    record = {"benchmark": "peer", "command": " ".join(["python -m bench.peer", *sys.argv[1:]]),
              "machine": machine.machine(), "versions": artifacts.package_versions(),
              "figures": figures}
    path = machine.results_path("peer", FLAGS.out)
    artifacts.write_json(path, record)
    print(json.dumps(figures["ratios"], indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
