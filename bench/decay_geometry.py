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
(`sdim_tf.outliers`), and MNIST test as a diagnosis of the decay measured there (reported,
never used to choose anything).

python -m bench.decay_geometry --checkpoints='/work/runs/fm-default/epochs/epoch_*.keras' \
    --epochs=1,2,5,10,20,30,40,50 --out=bench/results/decay_geometry.json
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from bench.checkpoints import epoch_of, finite, images_of, in_epoch_order
from bench.machine import machine
from bench.whitened_parts import geometry
from sdim_tf import density, outliers

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", None, "Glob of per-epoch .keras checkpoints (epoch_<k>).")
flags.DEFINE_string("epochs", "", "Only these epochs, comma separated (default: all).")
flags.DEFINE_string("layers", "head,quad3,quad4", "Layers to measure, comma separated.")
flags.DEFINE_string("out", "bench/results/decay_geometry.json", "Where the JSON goes.")
flags.DEFINE_string("data_dir", os.environ.get("SDIM_DATA_DIR"),
                    "Folder holding fashion_mnist/ and mnist/ IDX files.")
flags.DEFINE_integer("trained_images", 55000, "The run trained on the first N training "
                     "images; the rest are held out.")
flags.DEFINE_integer("fit_images", 5000, "Trained images the Gaussians are fitted on, "
                     "evenly strided.")
flags.DEFINE_integer("held_out_images", 2000, "Held-out images measured (from the first).")
flags.DEFINE_integer("outlier_images", 1000, "Held-out images each outlier set is built from.")
flags.DEFINE_integer("mnist_images", 2000, "MNIST test images (diagnosis only).")
flags.DEFINE_float("top_share", 0.1, "The share of covariance directions of most variance.")
flags.DEFINE_integer("batch_size", 500, "Images per forward pass.")
flags.DEFINE_integer("seed", 0, "Outlier seed.")


def features_of(encode, images: np.ndarray, batch_size: int) -> dict:
    parts = [encode(tf.constant(images[i:i + batch_size]))
             for i in range(0, len(images), batch_size)]
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def main(argv):
    del argv
    paths = in_epoch_order(FLAGS.checkpoints, epochs=FLAGS.epochs)
    layers = tuple(name for name in FLAGS.layers.split(",") if name)
    unknown = sorted(set(layers) - set(density.LAYERS))
    if unknown or not layers:
        sys.exit(f"error: --layers: unknown {unknown}; known: {', '.join(density.LAYERS)}")
    trained = FLAGS.trained_images
    fit_index = np.arange(FLAGS.fit_images) * (trained // FLAGS.fit_images)
    fit = images_of("fashion_mnist", "train", fit_index, data_dir=FLAGS.data_dir)
    held_out = images_of("fashion_mnist", "train",
                         np.arange(trained, trained + FLAGS.held_out_images),
                         data_dir=FLAGS.data_dir)
    sources = tuple(a[:FLAGS.outlier_images] for a in held_out)
    sets = {"held_out": held_out[0], **outliers.proxy_outliers(sources[0], FLAGS.seed),
            **outliers.part_outliers(*sources, seed=FLAGS.seed),
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
        fitted = features_of(encode, fit[0], FLAGS.batch_size)
        measured = {name: features_of(encode, images, FLAGS.batch_size)
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
