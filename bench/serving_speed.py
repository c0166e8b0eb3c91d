"""Where the serving signature's time goes: the bare forward pass, the scoring (on the
encoder as trained and with its batch norms folded, `sdim_tf.folding`) and the density alone,
and serving_default of each SavedModel, called as clients call it (the signature by keyword)
and as TF Serving runs it (a TF1 session on the signature's graph, no Python wrapper). Calls
interleave, so drift on a shared machine hits every row alike.

    python -m bench.serving_speed [--run_dir=RUN] [--baseline=NAME=SAVED_MODEL,...]

The model: a trained run's deployable (--run_dir), else the untrained default network with
the default density fitted on random images; exported by this checkout twice, with the
batch norms folded (`folded`) and left in (`unfolded`), and "fold" in the results gives
the first over the second. --baseline: other exports of the same model to time beside them
(the same run exported by another checkout, e.g. `python -m pipeline.run --stages=export
--export_dir=...` run from main); "over_baselines" gives this checkout's folded export over
each. Each SavedModel's ops are also traced in the session (--profile_calls): where a call's
op time goes, by part (`serving_timing.PARTS`). Writes
bench/results/<machine kind>/<--results_name>.json.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import tempfile

import numpy as np
import tensorflow as tf
from absl import app, flags

from bench import machine, serving_timing, timing
from bench.serving_timing import BATCHES
from sdim_tf import data, folding, publish, serving

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "A trained run whose deployable is exported and timed "
                    "(default: the untrained default network, density fitted on random "
                    "images).")
flags.DEFINE_list("baseline", [], "NAME=SAVED_MODEL: exports of the same model to time beside "
                  "this checkout's.")
flags.DEFINE_integer("rounds", 50, "Timed rounds: one batch of 256 per call and round, then "
                     "4 single images per call and round.")
flags.DEFINE_integer("profile_calls", 20, "Traced session calls per SavedModel and batch "
                     "size (0: no op profile).")
flags.DEFINE_integer("top_ops", 12, "Slowest ops listed per profile.")
flags.DEFINE_string("results_name", "serving_speed", "The results file's name: "
                    "bench/results/<machine kind>/<results_name>.json.")
flags.DEFINE_string("out", None, "JSON results (default: "
                    "bench/results/<machine kind>/<results_name>.json).")


def _module() -> serving.RejectingClassifier:
    if FLAGS.run_dir:
        from pipeline import run_dir

        return run_dir.Run(FLAGS.run_dir).deployable()
    return serving_timing.default_module()


def main(argv):
    del argv
    module = _module()
    scorer = module.model
    if not hasattr(scorer, "density_scores"):
        raise SystemExit("error: --run_dir must deploy --score=feature_density (the density "
                         "is what this benchmark times)")
    classifier = scorer.classifier
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (256, *module.source_size, module.channels), np.uint8)
    images = data.preprocess(raw).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        exports = {way: publish.export(module, tmp, way, fold_batch_norm=way == "folded")
                   for way in ("folded", "unfolded")}
        models = {**exports, **dict(item.split("=", 1) for item in FLAGS.baseline)}
        features = tf.function(lambda x: {k: v for k, v in classifier.encoder.features(
            x, training=False).items() if k in scorer.layer_names})
        tensors = {n: tf.constant(images[:n]) for n in BATCHES}
        calls = {
            "bare_forward": (tf.function(lambda x: classifier(x, training=False)), tensors),
            "scoring": (tf.function(scorer.scores_and_logits), tensors),
            "folded_scoring": (tf.function(folding.FoldedScorer(scorer).scores_and_logits),
                               tensors),
            "density": (tf.function(scorer.density_scores), {
                n: features(tensors[n]) for n in BATCHES})}
        sessions = {}
        for name, path in models.items():
            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
            calls[f"{name}/serving_default"] = (
                functools.partial(lambda sig, x: sig(images=x), signature), tensors)
            sessions[name] = serving_timing.Session(path)
            calls[f"{name}/session"] = (sessions[name], {n: images[:n] for n in BATCHES})
        with timing.cpu_and_wall() as spent:
            figures = serving_timing.time_calls(
                {k: (fn, x[256], x[1]) for k, (fn, x) in calls.items()}, FLAGS.rounds)
        serving_timing.over(figures, "bare_forward")
        fold = {way: {f"{key}_folded_over_unfolded": value for key, value in
                      serving_timing.ratios(figures[f"folded/{way}"],
                                            figures[f"unfolded/{way}"]).items()}
                for way in ("serving_default", "session")}
        baselines = {name: {f"{way}_folded_over_{name}": serving_timing.ratios(
            figures[f"folded/{way}"], figures[f"{name}/{way}"])
            for way in ("serving_default", "session")} for name in models if name not in exports}
        answers = {way: calls[f"{way}/serving_default"][0](tensors[256]) for way in exports}
        fold["answers_batch_256"] = serving_timing.compare(
            *({k: v.numpy() for k, v in answers[w].items()} for w in ("unfolded", "folded")))
        profiles = {f"batch_{n}": serving_timing.op_profiles(
            sessions, images[:n], FLAGS.profile_calls, FLAGS.top_ops)
            for n in BATCHES} if FLAGS.profile_calls else {}
    record = {"command": " ".join(["python -m bench.serving_speed", *sys.argv[1:]]),
              "machine": machine.machine(), "model": FLAGS.run_dir or "untrained default",
              "score": "feature_density " + ",".join(scorer.layer_names)
              + (" (split terms)" if scorer.split else ""),
              "saved_models": {k: str(v) for k, v in models.items() if k not in exports},
              "rounds": FLAGS.rounds, "cores_used": timing.cores_used(spent["cpu"], spent["wall"]),
              "fold": fold, "over_baselines": baselines, "rows": figures,
              "profile_parts": serving_timing.PARTS, "profiles": profiles}
    out = pathlib.Path(FLAGS.out) if FLAGS.out else machine.results_path(FLAGS.results_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, row in figures.items():
        latency = row["latency_ms_batch_1"]
        print(f"{name:40s} p50 {latency['p50']:7.3f} ms  p95 {latency['p95']:7.3f} ms  "
              f"{row['images_per_second_batch_256']:8.1f} images/s at 256")


if __name__ == "__main__":
    app.run(main)
