"""tf.distribute: MirroredStrategy on two logical CPUs and two local MultiWorker processes."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HELPER = pathlib.Path(__file__).with_name("distributed_worker.py")
ROOT = HELPER.parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def test_mirrored_matches_per_replica_halves(tmp_path):
    out = tmp_path / "mirrored.npz"
    subprocess.run([sys.executable, str(HELPER), "mirrored", str(out)], env=_env(),
                   check=True, timeout=300, capture_output=True)
    result = np.load(out)
    assert int(result["replicas"]) == 2
    # Loss: the mean of the replicas' half-batch losses.
    np.testing.assert_allclose(result["loss"], result["reference_loss"], rtol=1e-5)
    # SGD(lr=1): the weight change is the gradient of the mean loss. float32 sums run in
    # another order, so entries agree to 1e-5 of the largest gradient entry (6e3 here):
    # the Dense bias before batch norm has an exact gradient of 0 and only rounding noise.
    deltas = [k for k in result.files if k.startswith("delta")]
    assert len(deltas) == 50  # every trainable variable of this SDIM
    scale = max(np.abs(result["grad" + k[5:]]).max() for k in deltas)
    for key in deltas:
        grad = result["grad" + key[5:]]
        np.testing.assert_allclose(result[key], grad, rtol=1e-3, atol=1e-5 * scale)


def test_mirrored_adversarial_training(tmp_path):
    """The preset's PGD examples and their terms inside a step on two replicas: every term
    reported and finite, the loss their sum, the examples costlier than the clean images."""
    out = tmp_path / "robust.npz"
    subprocess.run([sys.executable, str(HELPER), "mirrored_robust", str(out)], env=_env(),
                   check=True, timeout=300, capture_output=True)
    r = np.load(out)
    assert int(r["replicas"]) == 2
    terms = ("mi_loss", "nll_loss", "lm_loss", "adv_nll_loss", "adv_lm_loss",
             "adv_reject_loss")
    assert all(np.isfinite(r[k]) for k in (*terms, "loss", "adv_accuracy"))
    np.testing.assert_allclose(r["loss"], sum(float(r[k]) for k in terms), rtol=1e-4)
    assert r["adv_nll_loss"] > r["nll_loss"] and r["adv_accuracy"] <= r["accuracy"]
    assert np.isfinite(r["changed"]).all() and (r["changed"] > 0).mean() > 0.5


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_processes_agree(tmp_path):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, str(HELPER), "multi_worker", str(tmp_path / f"w{index}.npz")],
            env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        output = proc.communicate(timeout=300)[0].decode(errors="replace")
        assert proc.returncode == 0, output[-3000:]
    first, second = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert int(first["replicas"]) == 2
    weights = [k for k in first.files if k.startswith("w")]
    moved = 0
    for key in weights:
        np.testing.assert_array_equal(first[key], second[key])
        moved += not np.allclose(first[key], first["init" + key[1:]])
    assert moved > len(weights) // 2  # training changed the weights
