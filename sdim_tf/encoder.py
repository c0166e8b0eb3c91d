"""ResNet 8n+2 for 32x32 inputs: (local feature map, global d-vector).

Follows the authors' choices, which give the paper's parameter counts: 3x3 convolutions
without bias, BasicBlocks with batch norm and ReLU, zero-padding ("option A") shortcuts, and
a head of global average pooling -> Dense(256) -> batch norm -> ReLU -> Dense(rep_dim).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import keras
import tensorflow as tf
from keras import layers, ops

from sdim_tf.fused_batch_norm import FusedBatchNormalization

# The class of the encoder's batch norms: Keras' on TensorFlow's fused kernel (same weights,
# so files saved with keras.layers.BatchNormalization load; bench/fused_batch_norm.py).
_batch_norm_class: type[layers.Layer] = FusedBatchNormalization


@contextlib.contextmanager
def batch_norm_class(cls: type[layers.Layer]) -> Iterator[None]:
    """Encoders built in the block use `cls` for their batch norms (kernel comparisons;
    `sdim_tf.folding` builds its inference-only encoder so)."""
    global _batch_norm_class
    previous, _batch_norm_class = _batch_norm_class, cls
    try:
        yield
    finally:
        _batch_norm_class = previous


def _batch_norm(name: str) -> layers.Layer:
    # PyTorch's BatchNorm2d defaults (momentum 0.1, eps 1e-5), as in the authors' code.
    return _batch_norm_class(name=name, momentum=0.9, epsilon=1e-5)


def quadrant_pool(x):
    """[N, H, W, C] -> [N, 4C]: the mean of each image quadrant, flattened. Unlike the global
    average it keeps where in the image a channel fires."""
    size = (x.shape[1] // 2, x.shape[2] // 2)
    return ops.reshape(ops.average_pool(x, size, strides=size, padding="valid"),
                       (-1, 4 * x.shape[-1]))


def subsample(x, stride: int):
    """x[:, ::stride, ::stride, :]. When the sides divide by `stride`, as a reshape and a slice
    of unit steps: the same values, and at batch 1 a fraction of the strided slice's time
    (oneDNN CPUs, bench/serving_speed.py)."""
    _, height, width, channels = x.shape
    if height is None or width is None or height % stride or width % stride:
        return x[:, ::stride, ::stride, :]
    blocks = ops.reshape(x, (-1, height // stride, stride, width // stride, stride, channels))
    return blocks[:, :, 0, :, 0, :]


def _conv3x3(filters: int, strides: int = 1, name: str | None = None) -> layers.Conv2D:
    return layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=name)


@keras.saving.register_keras_serializable(package="sdim_tf")
class BasicBlock(layers.Layer):
    """conv-bn-relu-conv-bn + shortcut, relu. Downsampling shortcut: stride 2 + zero channels."""

    def __init__(self, filters: int, strides: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides = filters, strides
        self.conv1 = _conv3x3(filters, strides, name="conv1")
        self.bn1 = _batch_norm("bn1")
        self.conv2 = _conv3x3(filters, name="conv2")
        self.bn2 = _batch_norm("bn2")

    def build(self, input_shape):
        self.conv1.build(input_shape)
        shape = self.conv1.compute_output_shape(input_shape)
        self.bn1.build(shape)
        self.conv2.build(shape)
        self.bn2.build(shape)
        self.in_channels = input_shape[-1]

    def call(self, x, training=None):
        out = ops.relu(self.bn1(self.conv1(x), training=training))
        out = self.bn2(self.conv2(out), training=training)
        shortcut = subsample(x, self.strides) if self.strides > 1 else x
        extra = self.filters - self.in_channels
        if extra:
            shortcut = ops.pad(shortcut, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
        return ops.relu(out + shortcut)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


@keras.saving.register_keras_serializable(package="sdim_tf")
class ResNetEncoder(layers.Layer):
    """ResNet with 8n+2 layers; `call(x)` returns (local feature map, global representation z).

    Stages 1-4 work at 32, 16, 8 and 4 pixels with 1+2n, 2n, 2n, 2n conv layers (paper,
    section 5). `local_stage` (1-4) picks the map handed to the MI critic: 4 (4x4, the paper's
    appendix B.2) or 2 (16x16, the authors' code).
    """

    def __init__(self, n: int = 1, rep_dim: int = 64,
                 filters: Sequence[int] = (32, 64, 128, 256), local_stage: int = 4,
                 head_units: int = 256, **kwargs):
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if len(filters) != 4:
            raise ValueError(f"filters must name 4 stages, got {tuple(filters)}")
        if local_stage not in (1, 2, 3, 4):
            raise ValueError(f"local_stage must be 1, 2, 3 or 4, got {local_stage}")
        self.n, self.rep_dim, self.filters = n, rep_dim, tuple(int(f) for f in filters)
        self.local_stage, self.head_units = local_stage, head_units
        self.stem = _conv3x3(self.filters[0], name="stem_conv")
        self.stem_bn = _batch_norm("stem_bn")
        self.stages = [
            [BasicBlock(f, strides=2 if (s > 0 and b == 0) else 1,
                        name=f"stage{s + 1}_block{b + 1}") for b in range(n)]
            for s, f in enumerate(self.filters)]
        self.pool = layers.GlobalAveragePooling2D(name="pool")
        self.fc = layers.Dense(head_units, name="fc")
        self.fc_bn = _batch_norm("fc_bn")
        self.out = layers.Dense(rep_dim, name="representation")

    def build(self, input_shape):
        self.stem.build(input_shape)
        shape = self.stem.compute_output_shape(input_shape)
        self.stem_bn.build(shape)
        for stage in self.stages:
            for block in stage:
                block.build(shape)
                shape = (*shape[:1], *[None if d is None else -(-d // block.strides)
                                       for d in shape[1:3]], block.filters)
        self.fc.build((None, self.filters[-1]))
        self.fc_bn.build((None, self.head_units))
        self.out.build((None, self.head_units))

    def call(self, x, training=None):
        features = self.features(x, training=training)
        return features[f"local{self.local_stage}"], features["z"]

    def features(self, x, training=None) -> dict:
        """Every intermediate output by name: `local1`-`local4` (the stage maps), `stage1`-
        `stage4` (their global average pools), `quad1`-`quad4` (their quadrant means,
        `quadrant_pool`), `head` (the ReLU'd 256-d layer) and `z`.

        An empty batch gets correctly shaped empty outputs without running the network on
        it: oneDNN's strided convolution returns a wrong shape for one on AVX-512 CPUs.
        """
        if training or isinstance(x, keras.KerasTensor):
            return self._features(x, training)
        x = tf.convert_to_tensor(x)
        n = tf.shape(x)[0]
        one = tf.tensor_scatter_nd_update(tf.shape(x), [[0]], [1])
        x = tf.ensure_shape(
            tf.cond(n > 0, lambda: x, lambda: tf.zeros(one, x.dtype)), [None, *x.shape[1:]])
        return {k: v[:n] for k, v in self._features(x, training).items()}

    def _features(self, x, training) -> dict:
        h = ops.relu(self.stem_bn(self.stem(x), training=training))
        features = {}
        for s, stage in enumerate(self.stages, start=1):
            for block in stage:
                h = block(h, training=training)
            features[f"local{s}"] = h
            features[f"stage{s}"] = self.pool(h)
            features[f"quad{s}"] = self._quadrant_pool(h)
        features["head"] = ops.relu(self.fc_bn(self.fc(features["stage4"]), training=training))
        features["z"] = self.out(features["head"])
        return features

    def _quadrant_pool(self, x):
        # serving's folded encoder (sdim_tf.folding) computes it in fewer microseconds
        return quadrant_pool(x)

    def normalized_layers(self) -> list[tuple[layers.Layer, layers.Layer]]:
        """(layer, the batch norm of its output) pairs: every convolution but the shortcut's
        (none) and the head's first dense layer."""
        pairs = [(self.stem, self.stem_bn)]
        for stage in self.stages:
            for block in stage:
                pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        return [*pairs, (self.fc, self.fc_bn)]

    def get_config(self):
        return {**super().get_config(), "n": self.n, "rep_dim": self.rep_dim,
                "filters": list(self.filters), "local_stage": self.local_stage,
                "head_units": self.head_units}
