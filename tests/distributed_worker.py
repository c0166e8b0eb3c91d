"""Subprocess helper for test_distribute.py: one training step under a real strategy.

    python tests/distributed_worker.py mirrored OUT.npz
    python tests/distributed_worker.py mirrored_robust OUT.npz
    TF_CONFIG=... python tests/distributed_worker.py multi_worker OUT.npz
"""

import sys

import tensorflow as tf

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE.startswith("mirrored"):  # two logical CPU devices, before TF initialises them
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sdim_tf  # noqa: E402
from pipeline.stages import train  # noqa: E402


def make_model(**kwargs):
    keras.utils.set_random_seed(0)
    model = sdim_tf.SDIM(4, (32, 32, 1), rep_dim=8, critic="dot", critic_units=16, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    return model


rng = np.random.default_rng(0)
x = rng.random((16, 32, 32, 1), dtype=np.float32)
y = np.arange(16) % 4

if MODE == "mirrored":
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = make_model()
    reference = make_model()
    reference.set_weights(model.get_weights())
    before = [v.numpy() for v in model.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices((x[:8], y[:8])).batch(8)
    logs = train.make_train_step(model, strategy)(
        iter(strategy.experimental_distribute_dataset(ds)))
    delta = [b - v.numpy() for b, v in zip(before, model.trainable_variables, strict=True)]
    grads, losses = [], []
    for half in (slice(0, 4), slice(4, 8)):  # each replica's half on one device
        with tf.GradientTape() as tape:
            terms, _ = reference._loss_terms(x[half], y[half], training=True)
        grads.append(tape.gradient(terms["loss"], reference.trainable_variables))
        losses.append(float(terms["loss"]))
    mean_grads = [(a.numpy() + b.numpy()) / 2 for a, b in zip(*grads, strict=True)]
    np.savez(OUT, loss=float(logs["loss"]), reference_loss=np.mean(losses),
             replicas=strategy.num_replicas_in_sync,
             **{f"delta{i}": d for i, d in enumerate(delta)},
             **{f"grad{i}": g for i, g in enumerate(mean_grads)})
elif MODE == "mirrored_robust":  # the preset's adversarial terms across two replicas
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = make_model(robust=dict(epsilon=0.3, steps=3, mode="both"))
    before = [v.numpy() for v in model.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    logs = train.make_train_step(model, strategy)(
        iter(strategy.experimental_distribute_dataset(ds)))
    np.savez(OUT, replicas=strategy.num_replicas_in_sync,
             changed=[float(np.abs(b - v.numpy()).max())
                      for b, v in zip(before, model.trainable_variables, strict=True)],
             **{k: float(v) for k, v in logs.items()})
else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = make_model()
    initial = [v.numpy() for v in model.trainable_variables]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    step = train.make_train_step(model, strategy)
    iterator = iter(strategy.experimental_distribute_dataset(ds.with_options(options)))
    for _ in range(3):
        logs = step(iterator)
    np.savez(OUT, replicas=strategy.num_replicas_in_sync, loss=float(logs["loss"]),
             **{f"w{i}": v.numpy() for i, v in enumerate(model.trainable_variables)},
             **{f"init{i}": v for i, v in enumerate(initial)})
