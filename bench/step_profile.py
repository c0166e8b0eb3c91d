"""Where a training step's time goes: the default SDIM's step (untrained, batch 128, cached
random 32 x 32 x 1 batches) traced with the TensorFlow profiler in float32 and in bfloat16,
its CPU kernel time split by model part and by op type; and whether the default run's input
pipeline could ever be what the step waits for.

    python -m bench.step_profile [--steps=5] [--warmup=3] [--precisions=float32,mixed_bfloat16]

What the trace holds (TensorFlow 2.21, host tracer level 2), and what is counted: the
`/host:CPU` plane of the written `*.xplane.pb` has a line per thread. On the executor threads
(`tf_Compute/...`) every op kernel is one event named `<op name>:<op type>` whose metadata's
display name is the op type; it lies inside an `ExecutorState::Process` event and contains
its own `ParallelFor` and `Memory*` events. The intra-op worker threads (`tf_numa_*_Eigen`)
hold only thread-pool regions, the shards of those same kernels, and the tf.data threads
`Iterator::...` events. So a kernel's time is its op event's duration minus the op events
nested in it on the same thread (a function-calling op would contain its body's kernels;
none nests in this step's traces): each kernel counts once, with the work it hands to the
pool. The step reading its batch is `IteratorGetNextOp::DoCompute` (part "input"). With
several executor threads, kernels overlap: kernel time over the steps' wall time can exceed
1, and its shortfall below the cores' count is time no kernel ran (executor, Python, idle).

Parts, by the op name's scope (Keras's `_<n>` suffixes and the gradients' `gradient_tape/`
prefix removed, so a layer's backward pass counts with its forward pass): PARTS below.

Writes bench/results/<machine kind>/step_profile.json. The input side times one epoch of the
train stage's own dataset (`pipeline.stages.train.epoch_dataset`, real Fashion-MNIST from
$SDIM_DATA_DIR ingested into a temporary folder) with nothing else running.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import statistics
import sys
import tempfile

import keras
import tensorflow as tf
from absl import app, flags
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from bench import timing, untrained
from bench.machine import machine, results_path
from pipeline import artifacts
from pipeline.stages import train

HOST_PLANE = "/host:CPU"
GET_NEXT = "IteratorGetNextOp::DoCompute"
PARTS = {
    "encoder_convolutions": "the encoder's convolutions (stem_conv, conv1, conv2)",
    "batch_norm": "every batch norm layer (bn, bn1, bn2, stem_bn, fc_bn): moments, "
                  "normalisation, moving averages",
    "encoder_other": "the rest of the encoder: ReLUs, shortcuts (subsample, pad, add), "
                     "pooling, the head's dense layers",
    "mi_critic": "the mutual-information critic (critic/...)",
    "gaussian_head": "the class-conditional Gaussians (class_conditional/...)",
    "losses_and_metrics": "unscoped ops: the loss terms, the metrics, the step's glue",
    "gradient_sums": "AddN_<n>: the tape's sums of the gradients of tensors used twice",
    "optimizer": "the optimizer's update (adam/...)",
    "input": "the step reading its batch (IteratorGetNext)",
}
_KERAS_SUFFIX = re.compile(r"_\d+$")
_BATCH_NORM = re.compile(r"^(bn\d*|\w+_bn)$")
_CONV = re.compile(r"^(conv\d*|\w+_conv)$")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str  # the op's name in the graph
    op_type: str
    picoseconds: int  # self time: nested kernels taken out


def kernels(space: xplane_pb2.XSpace) -> list[Kernel]:
    """The op kernels of the host plane, each with its self time (module docstring)."""
    found = []
    for plane in space.planes:
        if plane.name != HOST_PLANE:
            continue
        for line in plane.lines:
            found += _line_kernels(line, plane.event_metadata)
    return found


def _line_kernels(line, metadata) -> list[Kernel]:
    named = []
    for event in line.events:
        meta = metadata[event.metadata_id]
        name, _, op_type = meta.name.rpartition(":")
        if meta.name == GET_NEXT:
            name, op_type = "IteratorGetNext", "IteratorGetNext"
        elif not (name and meta.display_name == op_type):
            continue  # not an op kernel (executor, thread pool, tf.data, Python events)
        named.append((event.offset_ps, event.duration_ps, name, op_type))
    named.sort(key=lambda e: (e[0], -e[1]))  # a parent before the children it contains
    self_ps = [duration for _, duration, _, _ in named]
    open_ = []  # (index, end) of the events containing the current one, innermost last
    for i, (start, duration, _, _) in enumerate(named):
        while open_ and open_[-1][1] <= start:
            open_.pop()
        if open_:
            parent, parent_end = open_[-1]
            self_ps[parent] -= min(start + duration, parent_end) - start
        open_.append((i, start + duration))
    return [Kernel(name, op_type, ps)
            for (_, _, name, op_type), ps in zip(named, self_ps, strict=True)]


def part(op_name: str, op_type: str = "", optimizer: str = "adam") -> str:
    """The model part (a key of PARTS) an op of the SDIM training step belongs to."""
    if op_type == "IteratorGetNext":
        return "input"
    scopes = [_KERAS_SUFFIX.sub("", s) for s in op_name.split("/")]
    if scopes[0] == "gradient_tape":
        scopes = scopes[1:]
    if any(_BATCH_NORM.match(s) for s in scopes[:-1]):
        return "batch_norm"
    first = scopes[0] if len(scopes) > 1 else ""
    if first == "encoder":
        return "encoder_convolutions" if any(_CONV.match(s) for s in scopes[1:-1]) \
            else "encoder_other"
    named = {"critic": "mi_critic", "class_conditional": "gaussian_head",
             _KERAS_SUFFIX.sub("", optimizer): "optimizer"}  # a second Adam is adam_1
    if first in named:
        return named[first]
    if scopes[0] == "AddN":
        return "gradient_sums"
    return "losses_and_metrics"


def summarize(found: list[Kernel], wall_seconds: float, steps: int, optimizer: str = "adam",
              top: int = 15) -> dict:
    """Kernel time per step, over the wall time, and its shares by part and by op type (the
    `top` largest; their rest as `other`). Shares of the kernel time, rounded to 4 places."""
    total = sum(k.picoseconds for k in found)
    by_part, by_type = collections.Counter(), collections.Counter()
    for k in found:
        by_part[part(k.name, k.op_type, optimizer)] += k.picoseconds
        by_type[k.op_type] += k.picoseconds
    types = dict(by_type.most_common(top))
    rest = total - sum(types.values())
    if rest:
        types["other"] = rest
    return {"kernel_ms_per_step": round(total / 1e9 / steps, 1),
            "kernel_over_wall": round(total / 1e12 / wall_seconds, 3),
            "parts": {name: round(ps / total, 4) for name, ps in by_part.most_common()},
            "op_types": {name: round(ps / total, 4) for name, ps in types.items()}}


def read_trace(logdir: str | pathlib.Path) -> xplane_pb2.XSpace:
    written = sorted(pathlib.Path(logdir).rglob("*.xplane.pb"))
    if len(written) != 1:
        raise RuntimeError(f"{logdir}: expected one *.xplane.pb from the profiler, found "
                           f"{[str(p) for p in written]}")
    space = xplane_pb2.XSpace()
    space.ParseFromString(written[0].read_bytes())
    return space


def profile_steps(model: keras.Model, dataset: tf.data.Dataset, steps: int, warmup: int
                  ) -> dict:
    """`steps` training steps of `model` timed (median wall time, cores used), then `steps`
    more traced and summarized (`summarize`), after `warmup` untimed steps."""
    seconds = timing.training_steps(model, dataset, warmup)
    with timing.cpu_and_wall() as used:
        untraced = [seconds(1) for _ in range(steps)]
    with tempfile.TemporaryDirectory(prefix="sdim-step-profile-") as logdir:
        tf.profiler.experimental.start(logdir, options=tf.profiler.experimental.ProfilerOptions(
            host_tracer_level=2, python_tracer_level=0))
        try:
            traced = [seconds(1) for _ in range(steps)]
        finally:
            tf.profiler.experimental.stop()
        found = kernels(read_trace(logdir))
    median = statistics.median(untraced)
    batch = int(next(iter(dataset))[0].shape[0])
    return {"steps": steps, "step_ms_median": round(1000 * median, 1),
            "traced_step_ms_median": round(1000 * statistics.median(traced), 1),
            "images_per_second": timing.images_per_second(batch, median),
            "cores_used": timing.cores_used(used["cpu"], used["wall"]),
            **summarize(found, sum(traced), steps, model.optimizer.name)}


def profile_precision(policy: str, batch_size: int, steps: int, warmup: int) -> dict:
    """profile_steps of the default SDIM under the Keras dtype policy `policy`."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        return profile_steps(untrained.model("sdim", "concat"),
                             timing.random_batches(batch_size), steps, warmup)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def input_rate(folder: pathlib.Path, batch_size: int) -> dict:
    """One epoch of the default Fashion-MNIST run's training input, as the train stage builds
    it (its first epoch), read with nothing else running."""
    examples = timing.ingested(folder)
    config, trained, batch = timing.default_training(examples, batch_size)
    read = timing.read_through(train.epoch_dataset(examples, config.train, trained, batch, 1))
    after_first = read["seconds"] - read["first_batch_seconds"]
    return {"batch_size": batch, "images": read["images"],
            "seconds": round(read["seconds"], 2),
            "first_batch_seconds": round(read["first_batch_seconds"], 2),
            "images_per_second": timing.images_per_second(read["images"], read["seconds"]),
            "images_per_second_after_first_batch": timing.images_per_second(
                read["images"] - read["first_batch_images"], after_first)}


def main(argv):
    del argv
    f = flags.FLAGS
    figures = {"batch_size": f.batch_size, "warmup": f.warmup, "parts": PARTS,
               "precisions": {}}
    for policy in f.precisions:
        figures["precisions"][policy] = profile_precision(policy, f.batch_size, f.steps,
                                                          f.warmup)
        print(policy, json.dumps(figures["precisions"][policy], indent=1), flush=True)
    if f.input and figures["precisions"]:
        with tempfile.TemporaryDirectory(prefix="sdim-step-profile-") as tmp:
            figures["input"] = input_rate(pathlib.Path(tmp), f.batch_size)
        fastest = max(p["images_per_second"] for p in figures["precisions"].values())
        figures["input"]["over_fastest_step"] = round(
            figures["input"]["images_per_second_after_first_batch"] / fastest, 1)
        print("input", figures["input"], flush=True)
    record = {"benchmark": "step_profile",
              "command": " ".join(["python -m bench.step_profile", *sys.argv[1:]]),
              "machine": machine(), "versions": artifacts.package_versions(),
              "figures": figures}
    path = results_path("step_profile", f.out)
    artifacts.write_json(path, record)
    print(f"written to {path}")


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 5, "Timed steps, then as many traced, per precision.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, allocation).")
    flags.DEFINE_integer("batch_size", 128, "Training batch size.")
    flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras dtype policies.")
    flags.DEFINE_bool("input", True, "Also time one epoch of the default run's input.")
    flags.DEFINE_string("out", None, "Where the JSON goes (default bench/results; a folder "
                        "per machine kind under it).")
    app.run(main)
