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
The rounds and figures: bench/peer_timing.py.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile

import tensorflow as tf
from absl import app, flags

from bench import machine, peer_timing, ratios, untrained
from pipeline import artifacts, deployed
from pipeline.sections import ConfigError

DEFAULTS = peer_timing.Settings()

flags.DEFINE_string("peer_dir", None, "A checkout of github.com/p3i0t/robust-generative-"
                    "classifier (their sdim.py, resnet.py, mi_networks.py, losses/).")
flags.DEFINE_string("peer_python", sys.executable, "A python with torch (and numpy) that "
                    "runs their code (default: this one; sdim-tf's [peer] extra).")
flags.DEFINE_integer("rounds", DEFAULTS.rounds, "Interleaved rounds (each: ours, then "
                     "theirs, per figure).")
flags.DEFINE_integer("steps", DEFAULTS.steps, "Timed training steps per row and round.")
flags.DEFINE_integer("warmup", DEFAULTS.warmup, "Untimed training steps per row, before the "
                     "first round.")
flags.DEFINE_integer("batch_size", DEFAULTS.batch_size, "Training batch size.")
flags.DEFINE_list("precisions", list(DEFAULTS.precisions),
                  f"Among {', '.join(peer_timing.PRECISIONS)}.")
flags.DEFINE_list("critics", list(DEFAULTS.critics), "Our critics to train (concat: ours by "
                  "default, the paper's 4x4 map; dot: the authors' code's, 16x16 map).")
flags.DEFINE_integer("latency_calls", DEFAULTS.latency_calls, "Timed batch-1 serving calls "
                     "per row and round.")
flags.DEFINE_integer("throughput_calls", DEFAULTS.throughput_calls, "Timed batch-256 "
                     "serving calls per row and round.")
flags.DEFINE_integer("serving_warmup", DEFAULTS.serving_warmup, "Untimed serving calls per "
                     "row and batch size.")
flags.DEFINE_string("model_dir", None, "Our SavedModel to serve (a folder of versions, the "
                    "newest used; 1-channel images); default: an untrained export of the "
                    "default configuration, made in a temporary folder.")
flags.DEFINE_string("out", str(machine.RESULTS), "Where the JSON goes (a folder per machine "
                    "kind under it).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    settings = peer_timing.Settings(
        precisions=tuple(FLAGS.precisions), critics=tuple(FLAGS.critics),
        **{name: getattr(FLAGS, name) for name in ("rounds", "steps", "warmup", "batch_size",
                                                   "latency_calls", "throughput_calls",
                                                   "serving_warmup")})
    try:
        if not FLAGS.peer_dir:
            raise ConfigError("--peer_dir is required: a checkout of "
                              "github.com/p3i0t/robust-generative-classifier")
        settings.check()
        command = peer_timing.driver_command(FLAGS.peer_python, FLAGS.peer_dir,
                                             untrained.config("sdim").model)
        with peer_timing.Peer(command) as peer, \
                tempfile.TemporaryDirectory(prefix="sdim-peer-") as tmp:
            serve, path = peer_timing.our_serving(FLAGS.model_dir, pathlib.Path(tmp))
            figures = peer_timing.measure(settings, peer, serve, path)
            figures["peer"] = {"dir": str(pathlib.Path(FLAGS.peer_dir).resolve()),
                               "python": FLAGS.peer_python, **peer.info}
    except (ConfigError, deployed.DeployedModelError) as e:
        sys.exit(f"error: {e}")
    models = {critic: untrained.model("sdim", critic) for critic in settings.critics}
    threads = tf.config.threading
    figures["ours"] = {
        "parameters": {critic: model.count_params() for critic, model in models.items()},
        "threads": {"intra_op": threads.get_intra_op_parallelism_threads(),
                    "inter_op": threads.get_inter_op_parallelism_threads(),
                    "note": "0: TensorFlow's default, one per core"}}
    figures["settings"] = {"data": "random 32 x 32 x 1 images in [0, 1), labels 0-9",
                           **{k: list(v) if isinstance(v, tuple) else v
                              for k, v in vars(settings).items()}}
    figures["peak_flop_share"] = peer_timing.flop_shares(figures, models[settings.critics[0]])
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
