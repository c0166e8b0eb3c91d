"""Concurrent load on an exported SavedModel: threads of one process, and processes each
loading the same version, call its signatures with a fixed, seeded mix of valid and invalid
requests. Every answer must equal the answer the same request got alone, in a single
thread, beforehand (bitwise for class_ids, rejected and reason, 1e-5 for the scores; a
refused request must be refused with the same error).

    python -m bench.concurrent_load MODEL_DIR EXPECTED.npz --calls=N --seed=S --threads=T

runs one worker process (prints its figures as JSON): it imports TensorFlow and numpy only,
as a TensorFlow-only server would. `measure` runs the whole trial; `bench.run
--only=concurrency` and tests/test_concurrent_load.py call it.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from bench.header_bombs import png_header

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_BATCH = 64
# Outputs compared bitwise; the others (scores, log-likelihoods, probabilities) within
# SCORE_TOLERANCE.
EXACT = ("class_ids", "rejected", "reason")
SCORE_TOLERANCE = 1e-5
RSS_DRIFT = 0.05  # the second half of the calls may change resident memory by this share

_OP_SUFFIX = re.compile(r" \[Op:[^]]*\]$")

Request = tuple[str, np.ndarray]  # (signature, images)
Answer = dict[str, np.ndarray] | str  # the outputs, or the refusal "<error type>: <message>"


def _png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def _element(kind: str, rng: np.random.Generator) -> bytes:
    """One element of a classify_encoded request."""
    if kind == "png":
        return _png(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8))
    if kind == "text":
        return b"not an image " + rng.bytes(16)
    if kind == "gif":
        return b"GIF89a" + rng.bytes(32)
    if kind == "bad_header":
        return b"\x89PNG\r\n\x1a\n" + rng.bytes(8)
    return png_header(16000, 16000)


def _refused(kind: int, batch: int, rng: np.random.Generator) -> Request:
    """A request refused whole: wrong size, channels or rank; a body that does not decode."""
    if kind == 0:
        return "serving_default", rng.random((batch, 28, 28, 1), dtype=np.float32)
    if kind == 1:
        return "serving_default", rng.random((batch, 32, 32, 3), dtype=np.float32)
    if kind == 2:
        return "classify_raw", rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
    truncated = _png(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8))[:60]
    return "classify_encoded", np.array([truncated] * batch, dtype=object)


def requests(count: int, seed: int) -> list[Request]:
    """`count` requests of 1 to 64 images: float images with NaN, infinite and out-of-range
    rows (serving_default), uint8 images (classify_raw), PNGs mixed with non-images, broken
    headers and 16000 x 16000 headers (classify_encoded), and requests refused whole (wrong
    shape, rank or channels; a PNG whose body does not decode)."""
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        batch = int(rng.integers(1, MAX_BATCH + 1))
        kind = rng.choice(["float", "raw", "encoded", "refused"], p=[0.35, 0.2, 0.3, 0.15])
        if kind == "float":
            images = rng.random((batch, 32, 32, 1), dtype=np.float32)
            for row in np.flatnonzero(rng.random(batch) < 0.25):
                images[row, rng.integers(32), rng.integers(32)] = rng.choice(
                    [np.nan, np.inf, -np.inf, 1.5, -0.25])
            made.append(("serving_default", images))
        elif kind == "raw":
            made.append(("classify_raw",
                         rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)))
        elif kind == "encoded":
            kinds = rng.choice(["png", "text", "gif", "bad_header", "huge"], batch,
                               p=[0.6, 0.1, 0.1, 0.1, 0.1])
            made.append(("classify_encoded",
                          np.array([_element(k, rng) for k in kinds], dtype=object)))
        else:
            made.append(_refused(int(rng.integers(4)), batch, rng))
    return made


def digest(made: list[Request]) -> str:
    """Identifies a request list, so that a worker proves it regenerated the same one."""
    h = hashlib.sha256()
    for name, images in made:
        h.update(name.encode())
        h.update(b"".join(images.tolist()) if images.dtype == object else images.tobytes())
    return h.hexdigest()


def answer(signatures, request: Request) -> Answer:
    """One call, its outputs as numpy (strings as fixed-width bytes) or its refusal."""
    name, images = request
    try:
        outputs = signatures[name](images=tf.constant(images))
    except tf.errors.InvalidArgumentError as e:
        # The message names the failed check; the [Op:...] suffix names the call site.
        return f"{type(e).__name__}: {re.sub(_OP_SUFFIX, '', e.message)}"
    return {k: v.numpy().astype(bytes) if v.dtype == tf.string else v.numpy()
            for k, v in outputs.items()}


def warm(signatures, made: list[Request]) -> None:
    """One call of each signature, untimed: the first call of a loaded function pays for
    its setup (as TF Serving's warmup requests do before a version serves)."""
    for name in sorted({r[0] for r in made}):
        answer(signatures, next(r for r in made if r[0] == name))


def difference(got: Answer, expected: Answer) -> str | None:
    """What differs between two answers to one request, or None."""
    if isinstance(got, str) or isinstance(expected, str):
        return None if got == expected else f"{got!r:.200} != {expected!r:.200}"
    if set(got) != set(expected):
        return f"outputs {sorted(got)} != {sorted(expected)}"
    for key, value in expected.items():
        if key in EXACT or value.dtype.kind not in "f":
            if not np.array_equal(got[key], value):
                return f"{key} differs"
        elif not np.allclose(got[key], value, rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE,
                             equal_nan=True):
            with np.errstate(invalid="ignore"):  # -inf - -inf: a refused row on both sides
                gap = np.nanmax(np.abs(got[key] - value))
            return f"{key} differs by {gap:.3g}"
    return None


def save_answers(answers: list[Answer], path: str | os.PathLike, request_digest: str) -> None:
    arrays = {"digest": np.array(request_digest.encode())}
    for i, a in enumerate(answers):
        if isinstance(a, str):
            arrays[f"{i}/refused"] = np.array(a.encode())
        else:
            arrays.update({f"{i}/{k}": v for k, v in a.items()})
    np.savez(path, **arrays)


def load_answers(path: str | os.PathLike, count: int) -> tuple[list[Answer], str]:
    with np.load(path, allow_pickle=False) as saved:
        answers: list[Answer] = [{} for _ in range(count)]
        for key in saved.files:
            if key == "digest":
                continue
            i, name = key.split("/", 1)
            if name == "refused":
                answers[int(i)] = saved[key].item().decode()
            else:
                answers[int(i)][name] = saved[key]
        return answers, saved["digest"].item().decode()


def rss_mib() -> float:
    """Resident memory now (not the peak: ru_maxrss cannot show memory given back)."""
    resident_pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def load(signatures, made: list[Request], expected: list[Answer], threads: int) -> dict:
    """Calls every request from `threads` threads at once, in two halves (resident memory
    sampled between them and after); compares each answer with `expected`."""
    def timed(i: int) -> tuple[int, float, Answer]:
        start = time.perf_counter()
        got = answer(signatures, made[i])
        return i, time.perf_counter() - start, got

    half = len(made) // 2
    latencies, mismatches, rss = [], [], []
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for part in (range(half), range(half, len(made))):
            rss.append(rss_mib())
            for i, seconds, got in pool.map(timed, part):
                latencies.append(seconds)
                problem = difference(got, expected[i])
                if problem:
                    mismatches.append(f"call {i} ({made[i][0]}): {problem}")
    seconds = time.perf_counter() - start
    rss.append(rss_mib())
    images = sum(len(images) for _, images in made)
    return {
        "threads": threads, "calls": len(made), "images": images,
        "refused_calls": sum(isinstance(e, str) for e in expected),
        "mismatches": len(mismatches), "first_mismatches": mismatches[:5],
        "seconds": round(seconds, 2), "calls_per_second": round(len(made) / seconds, 2),
        "images_per_second": round(images / seconds, 1),
        "latency_ms": {p: round(1000 * float(np.percentile(latencies, q)), 1)
                       for p, q in (("p50", 50), ("p99", 99))},
        "rss_mib": {"first_half_start": round(rss[0], 1), "second_half_start": round(rss[1], 1),
                    "end": round(rss[2], 1), "second_half_drift": round(rss[2] / rss[1] - 1, 4)},
    }


def _worker(model_dir: str, expected_path: str, calls: int, seed: int, threads: int) -> dict:
    made = requests(calls, seed)
    expected, request_digest = load_answers(expected_path, calls)
    if digest(made) != request_digest:
        raise SystemExit("error: the worker's requests differ from the parent's")
    loaded = tf.saved_model.load(model_dir)  # held: its signatures need its variables
    signatures = loaded.signatures
    warm(signatures, made)
    figures = load(signatures, made, expected, threads)
    # The worker is what a TensorFlow-only server is.
    figures["imported"] = sorted(m for m in ("sdim_tf", "pipeline", "tensorflow_probability")
                                 if m in sys.modules)
    return figures


def measure(model_dir: str | os.PathLike, calls: int, seed: int = 0, threads: int = 8,
            processes: int = 2) -> dict:
    """The whole trial on one SavedModel version: the answers alone in one thread first,
    then `threads` threads of this process, then `processes` worker processes at once, each
    making every call."""
    model_dir = str(model_dir)
    made = requests(calls, seed)
    loaded = tf.saved_model.load(model_dir)  # held: its signatures need its variables
    signatures = loaded.signatures
    warm(signatures, made)
    start = time.perf_counter()
    expected = [answer(signatures, r) for r in made]  # alone, one thread
    alone_seconds = time.perf_counter() - start
    reasons = collections.Counter(reason.decode() or "accepted" for a in expected
                                  if not isinstance(a, str) for reason in a["reason"])
    figures = {"calls": calls, "seed": seed, "signatures": dict(collections.Counter(
        r[0] for r in made)), "rows_by_reason": dict(sorted(reasons.items())),
        "refused_requests": sum(isinstance(a, str) for a in expected),
        "alone": {"seconds": round(alone_seconds, 2),
                  "calls_per_second": round(calls / alone_seconds, 2)}}
    figures["in_threads"] = load(signatures, made, expected, threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "expected.npz"
        save_answers(expected, path, digest(made))
        command = [sys.executable, "-m", "bench.concurrent_load", model_dir, str(path),
                   f"--calls={calls}", f"--seed={seed}", "--threads=1"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
        start = time.perf_counter()
        workers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
                   for _ in range(processes)]
        outputs = [w.communicate(timeout=3600) for w in workers]
        seconds = time.perf_counter() - start
    for worker, (_, err) in zip(workers, outputs, strict=True):
        if worker.returncode != 0:
            raise RuntimeError(f"worker failed ({worker.returncode}): {err[-3000:]}")
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    figures["in_processes"] = {
        "processes": processes, "wall_seconds_with_startup": round(seconds, 2),
        "mismatches": sum(r["mismatches"] for r in results),
        "calls_per_second": round(sum(r["calls_per_second"] for r in results), 2),
        "images_per_second": round(sum(r["images_per_second"] for r in results), 1),
        "workers": results}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("expected", help="the answers alone (save_answers)")
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(_worker(args.model_dir, args.expected, args.calls, args.seed,
                             args.threads)))


if __name__ == "__main__":
    main()
