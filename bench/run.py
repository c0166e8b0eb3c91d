"""`python -m bench.run`: speed and memory of sdim-tf on this machine (a benchmark, not a test).

Writes bench/results/<machine kind>/<benchmark>.json (each with the machine, versions and
command; kinds in bench/machine.py, so one machine's figures never overwrite another's) and
prints a table, then the ratios that carry across machines (bench/ratios.py). SDIM_DATA_DIR
must hold the IDX data (input pipeline, calibration, memory).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from bench import concurrent_load, ratios, serving_timing, timing, untrained
from bench.machine import RESULTS, machine, results_path
from pipeline import artifacts, selection
from pipeline.stages import train
from sdim_tf import data, density, precision, precision_probe, publish, rejection

BENCHMARKS = ("training", "precision_probe", "input_pipeline", "serving", "serving_threads",
              "calibration", "memory", "reliability", "concurrency")

FLAGS = flags.FLAGS
flags.DEFINE_list("only", list(BENCHMARKS), f"Benchmarks to run: {', '.join(BENCHMARKS)}.")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Training dtype policies.")
flags.DEFINE_integer("steps", 20, "Timed training steps per configuration (after warm-up).")
flags.DEFINE_integer("warmup", 5, "Untimed training steps (tracing, allocation).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("calibration_images", None, "Limit the calibration benchmark (default: "
                     "all 60k training images).")
flags.DEFINE_integer("serving_calls", 50, "Timed serving calls at batch 256 (x4 at batch 1).")
flags.DEFINE_list("density_layers", list(density.DEFAULT_LAYERS), "serving: the density's "
                  "layers (the pipeline's default unless given).")
flags.DEFINE_bool("density_split", density.DEFAULT_SPLIT, "serving: the density's split terms "
                  "(the pipeline's default unless given).")
flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow's intra-op threads (0: its default, "
                     "one per core).")
flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow's inter-op threads (0: its default).")
flags.DEFINE_list("thread_settings", None, "serving_threads: INTRAxINTER settings to compare "
                  "(default: 1x1, 1xC, Cx1, CxC for C cores).")
flags.DEFINE_integer("memory_images", 8192, "Training images of the memory benchmark's run.")
flags.DEFINE_integer("fuzz_cases", 10000, "Generated requests of the reliability benchmark's "
                     "signature fuzzing (bench/fuzz_signatures.py), split over the three "
                     "signatures; 0: none.")
flags.DEFINE_integer("concurrency_calls", 400, "Requests of the concurrency benchmark (each "
                     "made alone, from 8 threads, and by each of 2 processes).")
flags.DEFINE_string("out", str(RESULTS), "Where the JSON results go (a folder per "
                    "machine kind under it).")


def _save(name: str, figures: dict) -> dict:
    record = {"benchmark": name, "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
              "machine": machine(), "versions": artifacts.package_versions(),
              "figures": figures}
    artifacts.write_json(results_path(name, FLAGS.out), record)
    return record


def training_throughput() -> dict:
    """Steady-state images/s of one training step (cached random batches: compute only)."""
    batch = FLAGS.batch_size
    dataset = timing.random_batches(batch)
    rows = {}
    for policy in FLAGS.precisions:
        for kind, critic in (("discriminative", None), ("sdim", "concat"), ("sdim", "dot")):
            keras.mixed_precision.set_global_policy(policy)
            try:
                model = untrained.model(kind, critic or "concat")
                seconds = timing.training_steps(model, dataset, FLAGS.warmup)(FLAGS.steps)
            finally:
                keras.mixed_precision.set_global_policy("float32")
            name = f"{kind}{'_' + critic if critic else ''}_{policy}"
            rows[name] = {"images_per_second": timing.images_per_second(FLAGS.steps * batch,
                                                                        seconds),
                          "step_ms": round(1000 * seconds / FLAGS.steps, 1)}
            print(f"training {name}: {rows[name]}", flush=True)
        disc = rows[f"discriminative_{policy}"]["step_ms"]
        for critic in ("concat", "dot"):
            rows[f"sdim_{critic}_{policy}"]["step_time_over_discriminative"] = round(
                rows[f"sdim_{critic}_{policy}"]["step_ms"] / disc, 3)
    return {"batch_size": batch, "steps": FLAGS.steps, "warmup": FLAGS.warmup, "rows": rows}


def probe_cost(tmp: pathlib.Path) -> dict:
    """What --mixed_precision=auto adds to a new run of the default Fashion-MNIST model at
    --batch_size: the speed probe's wall (and CPU) time on an empty cache, then on a filled
    one."""
    examples = timing.ingested(tmp)
    config, trained, batch = timing.default_training(examples, FLAGS.batch_size)
    measure = train.speed_probe(config.model, config.train, examples,
                                tf.distribute.get_strategy(), trained, batch,
                                selection.size(trained) // batch, precision.Hardware.detect(),
                                precision_probe.ProbeCache(tmp / "cache"))
    load = [os.getloadavg()[0]]
    with timing.cpu_and_wall() as probed:
        probe = measure()
    with timing.cpu_and_wall() as cached:
        measure()
    load.append(os.getloadavg()[0])
    return {"batch_size": batch, "warmup_steps": precision_probe.WARMUP_STEPS,
            "timed_steps": precision_probe.TIMED_STEPS,
            "probe_seconds": round(probed["wall"], 1),
            "probe_cpu_seconds": round(probed["cpu"], 1),  # all threads': less moved by load
            "cached_seconds": round(cached["wall"], 3), "choice": list(probe.choice()),
            "probe": probe.to_json(), "load_average_1min": load}


def input_pipeline(tmp: pathlib.Path) -> dict:
    """One training epoch of tf.data alone: TFRecords -> decode -> resize -> crop/flip."""
    dataset = timing.ingested(tmp).dataset("train", batch_size=FLAGS.batch_size, training=True)
    figures = {}
    for epoch in (1, 2):
        read = timing.read_through(dataset)
        figures[f"epoch_{epoch}"] = {"seconds": round(read["seconds"], 2),
                                     "images": read["images"],
                                     "images_per_second": timing.images_per_second(
                                         read["images"], read["seconds"])}
    return figures


def serving_speed(tmp: pathlib.Path) -> dict:
    """Each signature of the SavedModel the default pipeline exports (tied Gaussians on the
    encoder's layers, the deployed rule), loaded with tf.saved_model.load, against the bare
    forward pass of the same classifier, `model(x, training=False)` in a tf.function, on the
    same batches. Calls alternate between the two, so drift hits both alike."""
    module = serving_timing.default_module(FLAGS.density_layers, FLAGS.density_split)
    scorer = module.model
    model = scorer.classifier
    rng = np.random.default_rng(0)
    loaded = tf.saved_model.load(str(publish.export(module, tmp / "saved_models", "bench")))
    raw = rng.integers(0, 256, (256, 28, 28, 1), np.uint8)

    def floats(n):
        return tf.constant(data.preprocess(raw[:n]))

    calls = {
        "bare_forward": (tf.function(lambda x: model(x, training=False)), floats),
        # the deployed score alone, and under XLA: whether compiling would pay on this CPU
        "scoring": (tf.function(scorer.scores_and_logits), floats),
        "scoring_xla": (tf.function(scorer.scores_and_logits, jit_compile=True), floats)}
    inputs = {"serving_default": floats, "classify_raw": lambda n: tf.constant(raw[:n]),
              "classify_encoded": lambda n: tf.constant(
                  [tf.io.encode_png(image).numpy() for image in raw[:n]])}
    for name, make in inputs.items():
        # By keyword, as the README shows; a positional call takes a slower path in
        # TensorFlow's signature wrapper (`<name>_positional`); `<name>_function` is the
        # restored tf.function of the same graph.
        signature = loaded.signatures[name]
        calls[name] = (functools.partial(lambda sig, x: sig(images=x), signature), make)
        calls[f"{name}_positional"] = (signature, make)
        calls[f"{name}_function"] = (getattr(loaded, name), make)
    figures = serving_timing.time_calls(
        {name: (fn, make(256), make(1)) for name, (fn, make) in calls.items()},
        FLAGS.serving_calls)
    serving_timing.over(figures, "bare_forward")
    return {"calls": FLAGS.serving_calls, "score": "feature_density " + ",".join(
        FLAGS.density_layers) + (" (split terms)" if FLAGS.density_split else ""), "threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
            "rows": figures}


def serving_threads(tmp: pathlib.Path) -> dict:
    """The serving benchmark under each intra-/inter-op thread setting, each in its own
    process (TensorFlow fixes its thread pools when it starts): which setting serving users
    should choose for latency (batch 1) and for throughput (batch 256)."""
    cores = os.cpu_count() or 1
    settings = FLAGS.thread_settings or sorted(
        {"1x1", f"1x{cores}", f"{cores}x1", f"{cores}x{cores}"})
    rows = {}
    for setting in settings:
        try:
            intra, inter = (int(v) for v in setting.lower().split("x"))
        except ValueError:
            sys.exit(f"error: --thread_settings: {setting!r} is not INTRAxINTER, e.g. 1x2")
        out = tmp / f"threads_{intra}x{inter}"
        subprocess.run([sys.executable, "-m", "bench.run", "--only=serving",
                        f"--serving_calls={FLAGS.serving_calls}",
                        f"--density_layers={','.join(FLAGS.density_layers)}",
                        f"--{'' if FLAGS.density_split else 'no'}density_split",
                        f"--intra_op_threads={intra}",
                        f"--inter_op_threads={inter}", f"--out={out}"], check=True,
                       capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        figures = json.loads(results_path("serving", out).read_text())["figures"]
        rows[f"{intra}x{inter}"] = {"threads": figures["threads"], **{name: {
            "images_per_second_batch_256": row["images_per_second_batch_256"],
            "p50_ms_batch_1": row["latency_ms_batch_1"]["p50"]}
            for name, row in figures["rows"].items()
            if name in ("bare_forward", "serving_default")}}
        print(f"serving_threads {intra}x{inter}: {rows[f'{intra}x{inter}']}", flush=True)

    def best(figure, pick):
        return pick(rows, key=lambda k: rows[k]["serving_default"][figure])
    return {"cores": cores, "rows": rows,
            "lowest_latency_batch_1": best("p50_ms_batch_1", min),
            "highest_throughput_batch_256": best("images_per_second_batch_256", max)}


def reliability(tmp: pathlib.Path) -> dict:
    """Requests that used to cost gigabytes (PNG headers declaring 16000 x 16000 pixels) and a
    batch with one non-image, then --fuzz_cases generated requests (bench/fuzz_signatures.py),
    against a SavedModel (an untrained SDIM, thresholds at the median score of real images)
    in a TensorFlow-only process."""
    from bench import fuzz_signatures  # hypothesis (the test extra): this benchmark only

    raw = fuzz_signatures.real_images()
    path, module = untrained.export(tmp / "saved_models", "fuzz", raw)
    script = pathlib.Path(__file__).with_name("header_bombs.py")
    result = subprocess.run([sys.executable, str(script), str(path)], check=True,
                            capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    figures = {"limits": dataclasses.asdict(module.limits),
               **json.loads(result.stdout.strip().splitlines()[-1])}
    if FLAGS.fuzz_cases:
        start = time.perf_counter()
        worker = fuzz_signatures.run_worker(path, module, raw, FLAGS.fuzz_cases, 0, tmp / "fuzz")
        # a crashed worker is a result too: its exit code (negative: the signal) and case
        figures["fuzz"] = worker.figures or {"returncode": worker.returncode,
                                             "last_case": worker.last_case,
                                             "stderr": worker.stderr[-3000:]}
        figures["fuzz"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    return figures


def concurrency(tmp: pathlib.Path) -> dict:
    """One SavedModel version under concurrent load: 8 threads of one process, then 2
    TensorFlow-only processes, on a seeded mix of valid and invalid requests, every answer
    checked against the same request's answer alone (bench/concurrent_load.py)."""
    path, _ = untrained.export(tmp / "saved_models", "concurrency")
    return concurrent_load.measure(path, FLAGS.concurrency_calls, seed=0, threads=8,
                                   processes=2)


def calibration_speed(tmp: pathlib.Path) -> dict:
    """The calibrate stage's pass (log-likelihoods + thresholds) against a plain predict."""
    examples = timing.ingested(tmp)
    model = untrained.model("sdim")
    limit = FLAGS.calibration_images
    # warm both paths (tracing) on one batch first
    rejection.class_scores(model, examples.dataset("train", limit=500))
    plain_dataset = examples.dataset("train", limit=limit).map(lambda x, y: x)
    model.predict(plain_dataset.take(1), verbose=0)
    start = time.perf_counter()
    ll, labels = rejection.class_scores(model, examples.dataset("train", limit=limit))
    rejection.calibrate(ll, labels, (1, 2))
    calibration = time.perf_counter() - start
    start = time.perf_counter()
    model.predict(plain_dataset, verbose=0)
    plain = time.perf_counter() - start
    return {"images": int(len(labels)), "calibration_seconds": round(calibration, 2),
            "plain_inference_seconds": round(plain, 2),
            "calibration_over_inference": round(calibration / plain, 3)}


def memory(tmp: pathlib.Path) -> dict:
    """Peak resident memory of a real training run (ingest + train, one epoch)."""
    run_dir = tmp / "memory_run"
    command = [sys.executable, "-m", "pipeline.run", "--stages=ingest,train", "--epochs=1",
               f"--train_limit={FLAGS.memory_images}", f"--run_dir={run_dir}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {"command": " ".join(command[1:]), "peak_rss_gib": round(peak_kib / 2**20, 3),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv):
    del argv
    unknown = set(FLAGS.only) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"error: --only: unknown {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    if FLAGS.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    if FLAGS.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="sdim-bench-"))
    runs = {"training": training_throughput, "precision_probe": lambda: probe_cost(tmp),
            "input_pipeline": lambda: input_pipeline(tmp),
            "serving": lambda: serving_speed(tmp),
            "serving_threads": lambda: serving_threads(tmp),
            "calibration": lambda: calibration_speed(tmp),
            "memory": lambda: memory(tmp), "reliability": lambda: reliability(tmp),
            "concurrency": lambda: concurrency(tmp)}
    results = {}
    for name in [b for b in BENCHMARKS if b in FLAGS.only]:
        print(f"== {name}", flush=True)
        results[name] = _save(name, runs[name]())["figures"]
    print(table(results))
    found = ratios.ratios(results)
    if found:
        # merged into this machine's earlier ratios: a run of some benchmarks keeps the rest
        path = results_path("ratios", FLAGS.out)
        earlier = json.loads(path.read_text())["figures"] if path.exists() else {}
        _save("ratios", {**earlier, **found})
        print(table({"ratios": found}))


def table(results: dict) -> str:
    lines = ["| benchmark | figure | value |", "|---|---|---|"]
    for name, figures in results.items():
        for key, value in _flatten(figures):
            lines.append(f"| {name} | {key} | {value} |")
    return "\n".join(lines)


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), obj


if __name__ == "__main__":
    app.run(main)
