"""Timing serving calls, shared by bench/run.py's serving benchmark and bench/serving_speed.py:
the default deployable, interleaved timing of calls, a SavedModel run as TF Serving runs it;
and whether two exports answer alike (bench/export_parity.py, bench/serving_speed.py)."""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from bench import timing, untrained
from sdim_tf import density, serving

BATCHES = (256, 1)
CALLS_PER_ROUND = {"batch_256": 1, "batch_1": 4}  # `time_calls`' calls per row and round


def default_module(layers=density.DEFAULT_LAYERS, split=density.DEFAULT_SPLIT, seed=0
                   ) -> serving.RejectingClassifier:
    """What the default pipeline deploys, untrained: the default SDIM network, tied Gaussians on
    `layers` fitted on 512 random images, thresholds 0 (its weights do not change the cost)."""
    model = untrained.model("sdim")
    scorer = density.FeatureDensity(model, 10, layers, split)
    images = np.random.default_rng(seed).random((512, 32, 32, 1), np.float32)
    scorer.fit_features([(images, np.arange(512) % 10)])
    return serving.RejectingClassifier(scorer, np.zeros(10), 1, (28, 28))


def time_calls(calls: dict, rounds: int, seed: int = 0) -> dict:
    """{name: images/s at batch 256, latency percentiles at batch 1} for `calls`, {name: (fn,
    batch of 256, batch of 1)}, each round calling them in a new random order (no call always
    follows the same one). Throughput and latency in separate phases: a batch of 256 just
    before a single image leaves the caches and thread pools as a stream of single requests
    would not. Per row and phase, `cores_used`: the process's CPU seconds over wall seconds
    during its calls (how much of the shared cores it had), and `cpu_ms_per_call`: its CPU
    time per call (the work a call costs, which waiting for shared cores moves less than
    the wall time; spin-waiting threads count too)."""
    for fn, big, one in calls.values():  # tracing, allocation
        for _ in range(3):
            timing.block(fn(big)), timing.block(fn(one))
    rng = np.random.default_rng(seed)
    seconds = dict.fromkeys(calls, 0.0)
    latencies = {name: [] for name in calls}
    spent = {phase: {name: [0.0, 0.0] for name in calls} for phase in CALLS_PER_ROUND}

    def timed(phase, name, fn, inputs, count):
        with timing.cpu_and_wall() as times:
            call_seconds = timing.call_seconds(fn, inputs, count)
        spent[phase][name][0] += times["cpu"]
        spent[phase][name][1] += times["wall"]
        return call_seconds

    for _ in range(rounds):
        for name in rng.permutation(list(calls)):
            fn, big, _ = calls[name]
            seconds[name] += sum(timed("batch_256", name, fn, big,
                                       CALLS_PER_ROUND["batch_256"]))
    for _ in range(rounds):
        for name in rng.permutation(list(calls)):
            fn, _, one = calls[name]
            latencies[name] += timed("batch_1", name, fn, one, CALLS_PER_ROUND["batch_1"])
    return {name: {
        "images_per_second_batch_256": timing.images_per_second(
            rounds * CALLS_PER_ROUND["batch_256"] * 256, seconds[name]),
        "latency_ms_batch_1": {f"p{p}": timing.percentile_ms(latencies[name], p)
                               for p in (50, 95, 99)},
        "cores_used": {phase: timing.cores_used(*spent[phase][name]) for phase in spent},
        "cpu_ms_per_call": {phase: round(1000 * spent[phase][name][0] / (rounds * calls_per),
                                         3) for phase, calls_per in CALLS_PER_ROUND.items()}}
        for name in calls}


def ratios(row: dict, base: dict) -> dict:
    """Figures of row `row` over row `base`'s (rows of `time_calls`): images/s at batch 256,
    p50 latency at batch 1, and CPU time per call at each."""
    return {"throughput": round(row["images_per_second_batch_256"]
                                / base["images_per_second_batch_256"], 3),
            "p50_latency": round(row["latency_ms_batch_1"]["p50"]
                                 / base["latency_ms_batch_1"]["p50"], 3),
            **{f"cpu_{phase}": round(row["cpu_ms_per_call"][phase]
                                     / base["cpu_ms_per_call"][phase], 3)
               for phase in CALLS_PER_ROUND}}


def over(figures: dict, baseline: str) -> None:
    """Adds each row's throughput and p50 latency over row `baseline`'s."""
    for name, row in figures.items():
        if name != baseline:
            row.update({f"{key}_over_{baseline}": value
                        for key, value in ratios(row, figures[baseline]).items()})


class Session:
    """serving_default of a SavedModel in a TF1 session, as TF Serving runs it (C++ only)."""

    def __init__(self, path, signature: str = "serving_default"):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.session = tf.compat.v1.Session(graph=self.graph)
            meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], str(path))
        spec = meta.signature_def[signature]
        self.input = spec.inputs["images"].name
        self.outputs = {k: v.name for k, v in spec.outputs.items()}

    def __call__(self, images, **kwargs):
        return self.session.run(self.outputs, {self.input: images}, **kwargs)


# The parts of a serving call in `op_profiles`, by op type and name scope.
PARTS = {
    "convolutions": "the encoder's convolutions (fused with their bias and ReLU)",
    "encoder_other": "the rest of the encoder: shortcuts (subsample, pad, add), ReLUs, "
                     "pooling, the head's dense layers",
    "density": "the density's ops (under `density_scores`)",
    "checks_and_outputs": "the rest: the request checks, the empty-batch guard, the "
                          "decision rule, the outputs (softmax, strings)",
}
_ENCODER_SCOPES = ("stem", "stage", "pool", "fc", "representation", "Relu", "AvgPool")


def op_part(node: str, op_type: str) -> str:
    """The part of PARTS a traced op belongs to."""
    if "Conv2D" in op_type:
        return "convolutions"
    scope = node.rpartition("StatefulPartitionedCall/")[2]
    if "density_scores" in scope:
        return "density"
    if scope.startswith(_ENCODER_SCOPES) or "quadrant_pool" in scope:
        return "encoder_other"
    return "checks_and_outputs"


def op_profiles(sessions: dict, images, calls: int, top: int) -> dict:
    """{name: its ops over `calls` traced runs of `images`} for `sessions` ({name: Session}),
    their runs interleaved: how many ops ran, the median over runs of their summed time and
    of the density's (ops under `density_scores`; sums exceed the wall time, ops run in
    parallel, and tracing slows small ops), ops and mean summed time per part (PARTS), and
    the `top` slowest ops by mean time."""
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    micros = {name: collections.defaultdict(float) for name in sessions}
    types = {}
    totals = {name: [] for name in sessions}
    for _ in range(calls):
        for name, session in sessions.items():
            metadata = tf.compat.v1.RunMetadata()
            session(images, options=options, run_metadata=metadata)
            nodes = [node for device in metadata.step_stats.dev_stats
                     for node in device.node_stats]
            for node in nodes:
                micros[name][node.node_name] += node.all_end_rel_micros / calls
                # "name = OpType(inputs)"
                types[node.node_name] = node.timeline_label.partition(" = ")[2].partition(
                    "(")[0]
            totals[name].append((sum(n.all_end_rel_micros for n in nodes),
                                 sum(n.all_end_rel_micros for n in nodes
                                     if "density_scores" in n.node_name)))
    result = {}
    for name in sessions:
        parts = {part: [0, 0.0] for part in PARTS}
        for node, value in micros[name].items():
            part = parts[op_part(node, types[node])]
            part[0] += 1
            part[1] += value
        result[name] = {
            "ops": len(micros[name]),
            "op_microseconds": round(float(np.median([t for t, _ in totals[name]]))),
            "density_op_microseconds": round(float(np.median([d for _, d in totals[name]]))),
            "parts": {part: {"ops": count, "op_microseconds": round(value)}
                      for part, (count, value) in parts.items()},
            "slowest": {k.rpartition("StatefulPartitionedCall/")[2]: round(v, 1)
                        for k, v in sorted(micros[name].items(), key=lambda kv: -kv[1])[:top]}}
    return result


EXACT = ("class_ids", "rejected", "reason", "class_name")
FLOATS = ("class_scores", "score", "threshold", "gap", "probabilities")


def answers(path, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """{output: [N, ...]} of serving_default over `images` in requests of `batch_size`."""
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    parts = [signature(images=tf.constant(images[i:i + batch_size]))
             for i in range(0, len(images), batch_size)]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def compare(before: dict, after: dict) -> dict:
    """The outputs that differ bit for bit, and the float outputs' largest differences."""
    result = {"images": int(len(before["class_ids"]))}
    for key in EXACT:
        differ = (before[key] != after[key]).reshape(len(before[key]), -1).any(1)
        result[f"{key}_differ"] = int(differ.sum())
    for key in FLOATS:
        a, b = before[key].astype(np.float64), after[key].astype(np.float64)
        finite = np.isfinite(a) & np.isfinite(b)
        result[f"{key}_nonfinite_differ"] = int((~finite & (a != b)).sum())
        difference = np.abs(a - b)[finite]
        scale = np.maximum(np.abs(a), 1.0)[finite]
        result[f"{key}_max_abs_difference"] = float(difference.max(initial=0.0))
        result[f"{key}_max_difference_over_max(|value|,1)"] = float(
            (difference / scale).max(initial=0.0))
    margin = np.abs(before["score"].astype(np.float64) - before["threshold"])
    result["smallest_abs_score_minus_threshold"] = float(
        margin[np.isfinite(margin)].min(initial=np.inf))
    gap = before["gap"][np.isfinite(before["gap"])]
    result["smallest_gap"] = float(gap.min()) if gap.size else None
    result["bitwise_identical_decisions"] = all(result[f"{k}_differ"] == 0 for k in EXACT)
    return result
