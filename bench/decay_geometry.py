"""Why rejection decays with training: the geometry of the density's layers per epoch.

For each checkpoint and layer, tied Gaussians fitted on trained images (as the deployed
density, `sdim_tf.density.TiedGaussianStats`). In their whitened space, where held-out images
have unit variance in every direction, each image's deviation r from its nearest class mean
is split two ways:
- `between`: its part in the span of the class means (the C-1 directions that tell classes
  apart); `rest`: the other directions, the same for every class; `split`: both squared
  lengths standardised by their own chi-square mean and spread, then summed, so the C-1
  directions weigh as much as all the rest;
- along the eigenvectors of the shared covariance: the directions of most and of least
  within-class variance.
Reported per set: median squared lengths, and each part's AUROC against held-out images.
Sets: held-out images (the last 5000 training images), the outliers built from them
(`sdim_tf.outlier_proxies`), and MNIST test as a diagnosis of the decay measured there (reported,
never used to choose anything).

python -m bench.decay_geometry --checkpoints='/work/runs/fm-default/epochs/epoch_*.keras' \
    --checkpoint_epochs=1,2,5,10,20,30,40,50 --out=bench/results/decay_geometry.json
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import keras
import numpy as np
from absl import app, flags

from bench.checkpoints import (
    define_data_flags,
    epoch_of,
    finite,
    held_out_data,
    images_of,
    in_epoch_order,
)
from bench.machine import machine
from bench.whitened_parts import geometry
from sdim_tf import density, monitoring

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "Glob of per-epoch .keras checkpoints (epoch_<k>).")
flags.DEFINE_string("checkpoint_epochs", "", "Only these epochs' checkpoints, comma separated "
                    "(default: all).")
flags.DEFINE_string("layers", "head,quad3,quad4", "Layers to measure, comma separated.")
flags.DEFINE_string("out", "bench/results/decay_geometry.json", "Where the JSON goes.")
define_data_flags(held_out_images=2000)
flags.DEFINE_integer("mnist_images", 2000, "MNIST test images (diagnosis only).")
flags.DEFINE_float("top_share", 0.1, "The share of covariance directions of most variance.")


def main(argv):
    del argv
    paths = in_epoch_order(FLAGS.checkpoints, epochs=FLAGS.checkpoint_epochs)
    layers = tuple(name for name in FLAGS.layers.split(",") if name)
    unknown = sorted(set(layers) - set(density.LAYERS))
    if unknown or not layers:
        sys.exit(f"error: --layers: unknown {unknown}; known: {', '.join(density.LAYERS)}")
    fit, held_out, built = held_out_data()
    sets = {"held_out": held_out[0], **built,
            "mnist (diagnosis only)": images_of("mnist", "test", np.arange(FLAGS.mnist_images),
                                                data_dir=FLAGS.data_dir)[0]}
    record = {"command": " ".join(["python -m bench.decay_geometry", *sys.argv[1:]]),
              "machine": machine(),
              "settings": {"fit_images": FLAGS.fit_images, "held_out_images":
                           FLAGS.held_out_images, "outlier_images": FLAGS.outlier_images,
                           "mnist_images": FLAGS.mnist_images, "top_share": FLAGS.top_share,
                           "layers": list(layers), "seed": FLAGS.seed},
              "checkpoints": []}
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in paths:
        started = time.time()
        model = keras.models.load_model(path, compile=False)
        scorer = density.FeatureDensity(model, model.config["num_classes"], layers)
        encode = scorer.encode_function()
        fitted = monitoring.batched(encode, fit[0], FLAGS.batch_size)
        measured = {name: monitoring.batched(encode, images, FLAGS.batch_size)
                    for name, images in sets.items()}
        entry = {"epoch": epoch_of(path), "path": path, "layers": {
            layer: geometry(fitted[layer], fit[1], {n: m[layer] for n, m in measured.items()},
                            model.config["num_classes"], FLAGS.top_share) for layer in layers}}
        entry["seconds"] = round(time.time() - started, 1)
        record["checkpoints"].append(finite(entry))
        out.write_text(json.dumps(record, indent=1) + "\n")
        head = entry["layers"][layers[0]]
        mnist = head["sets"]["mnist (diagnosis only)"]
        print(f"epoch {entry['epoch']}: {layers[0]} effective dim {head['effective_dim']:.1f}"
              f"/{head['dim']}, class spread {head['class_mean_spread']:.1f}; MNIST AUROC "
              f"full {mnist['auroc_full']:.3f} between {mnist['auroc_between']:.3f} rest "
              f"{mnist['auroc_rest']:.3f} ({entry['seconds']} s)", flush=True)
        del model, scorer
        keras.backend.clear_session()


if __name__ == "__main__":
    app.run(main)
