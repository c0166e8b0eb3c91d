"""Why a prediction was made or refused: attribution maps of the class log-likelihoods and
the geometry of the representations.

tf-keras-vis works on functional Keras models only, so `functional_view` rebuilds the
trained classifier as one, sharing its layers (and so its weights).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from sdim_tf.encoder import quadrant_pool

METHODS = ("saliency", "smoothgrad", "gradcam++")


def functional_view(model) -> keras.Model:
    """images -> logits (for SDIM the summed log p(x|c); for a `density.FeatureDensity` its
    class scores) as a functional Keras model on `model`'s own layers; its last residual
    block is named by `last_block_name`."""
    base = getattr(model, "classifier", model)
    enc = base.encoder
    inputs = keras.Input(tuple(base.config["input_shape"]), name="images")
    h = layers.Activation("relu", name="stem_relu")(enc.stem_bn(enc.stem(inputs)))
    features = {}
    for s, stage in enumerate(enc.stages, start=1):
        for block in stage:
            h = block(h)
        features[f"stage{s}"] = enc.pool(h)
        features[f"quad{s}"] = quadrant_pool(h)
    features["head"] = layers.Activation("relu", name="fc_relu")(
        enc.fc_bn(enc.fc(features["stage4"])))
    features["z"] = enc.out(features["head"])
    if hasattr(model, "density_scores"):
        outputs = model.density_scores({k: features[k] for k in model.layer_names})
    else:
        outputs = base.logits_from_features(features)
    return keras.Model(inputs, outputs, name=f"{model.name}_view")


def last_block_name(model) -> str:
    """The 4x4 feature map GradCAM++ weighs (the last residual block)."""
    return getattr(model, "classifier", model).encoder.stages[-1][-1].name


def attribution_maps(view: keras.Model, images: np.ndarray, classes: np.ndarray,
                     method: str, block: str | None = None, smooth_samples: int = 16,
                     seed: int = 0) -> np.ndarray:
    """[N, H, W] maps in [0, 1] of how each pixel drives the logit of `classes`.

    saliency: |d logit / d x|, max over channels; smoothgrad: the same averaged over noisy
    copies (noise 0.2); gradcam++: GradCAM++ on the `block` feature map, upsampled.
    """
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.saliency import Saliency

    classes = tf.constant(np.asarray(classes, np.int32))
    images = np.asarray(images, np.float32)

    def score(output):
        return tf.gather(output, classes, axis=1, batch_dims=1)

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "gradcam++" and block is None:
        raise ValueError("gradcam++ needs the feature-map layer name (`block`)")
    with warnings.catch_warnings():
        # tf-keras-vis calls the one-input view with a list of one tensor; Keras warns.
        warnings.filterwarnings("ignore", "The structure of `inputs` doesn't match",
                                UserWarning)
        if method in ("saliency", "smoothgrad"):
            tf.random.set_seed(seed)  # SmoothGrad's noise
            maps = Saliency(view, clone=False)(
                score, images, smooth_samples=smooth_samples if method == "smoothgrad" else 0,
                smooth_noise=0.2)
        else:
            # GradCAM++ weighs by exp(score), which underflows to 0 for log-likelihoods in
            # the hundreds; the normalised map is invariant to a per-image shift: shift to 0.
            def shifted(output):
                picked = score(output)
                return picked - tf.stop_gradient(picked)

            maps = GradcamPlusPlus(view, clone=False)(shifted, images, penultimate_layer=block,
                                                       seek_penultimate_conv_layer=False)
    return np.nan_to_num(np.asarray(maps, np.float32))


def representations(model, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The encoder's global representations z, [N, d]."""
    encoder = getattr(model, "classifier", model).encoder
    encode = tf.function(lambda x: encoder(x, training=False)[1])
    return np.concatenate([encode(images[i:i + batch_size]).numpy()
                           for i in range(0, len(images), batch_size)])


def pca(points: np.ndarray, k: int = 2, center: np.ndarray | None = None):
    """(projection function, explained variance ratios) of the top-k principal axes."""
    points = np.asarray(points, np.float64)
    mean = points.mean(0) if center is None else center
    _, s, vt = np.linalg.svd(points - mean, full_matrices=False)
    axes = vt[:k]
    ratios = (s[:k] ** 2) / (s ** 2).sum()
    return (lambda x: (np.asarray(x, np.float64) - mean) @ axes.T), ratios
