"""bench.peer's arithmetic against hand numbers, and its driver protocol against a fake peer
(the real driver needs torch, which this environment lacks: its refusals are tested here)."""

import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from bench import machine, peer_driver, peer_timing, ratios, timing, untrained
from pipeline.sections import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_training_flop_of_the_papers_resnet10_by_hand():
    # stem 32*32*1*32*9 = 294,912; stage 1 at 32 px: 1024*9*(32*32 + 32*32) = 18,874,368;
    # stages 2-4 (16, 8, 4 px): 256*9*(32*64 + 64*64) = 64*9*(64*128 + 128*128)
    # = 16*9*(128*256 + 256*256) = 14,155,776 each; head 256*256 + 256*64 = 81,920:
    # 61,718,528 multiply-adds forward, x 2 FLOP x 3 (forward and backward).
    assert peer_timing.train_gflop_per_image(1, (32, 64, 128, 256), 256, 64) == pytest.approx(
        6 * 61_718_528 / 1e9)
    # n = 2: one more block per stage, two convs of width^2 * side^2 * 9 = 9,437,184 each
    assert peer_timing.train_gflop_per_image(2, (32, 64, 128, 256), 256, 64) == pytest.approx(
        6 * (61_718_528 + 4 * 2 * 9_437_184) / 1e9)


def test_our_model_has_the_size_the_peer_driver_builds():
    model = untrained.model("sdim", "concat")
    command = peer_timing.driver_command("python", "their_dir", untrained.config().model)
    theirs = peer_driver.parse(command[3:])
    assert command[:2] == ["python", "-I"]
    # Bazel runs the tests from a runfiles tree of symlinks to the same files.
    assert pathlib.Path(command[2]).resolve() == (ROOT / "bench" / "peer_driver.py").resolve()
    encoder = model.encoder
    assert (theirs.n, theirs.rep_dim) == (encoder.n, encoder.rep_dim) == (1, 64)
    assert theirs.mi_units == model.critic.units == 256
    assert (theirs.margin, theirs.alpha, theirs.beta, theirs.gamma) == (10, 1, 1, 1)
    assert encoder.filters == (32, 64, 128, 256) and encoder.head_units == 256


@pytest.mark.parametrize("flags, precision, unit, gflops", [
    # 2 cores x 2.6 GHz x FLOP per cycle and core
    (["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "float32", "avx512f", 2 * 2.6 * 64),
    (["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "bfloat16", "amx_bf16", 2 * 2.6 * 1024),
    (["avx2", "avx512f", "avx512_bf16"], "bfloat16", "avx512_bf16", 2 * 2.6 * 128),
    (["avx2"], "float32", "avx2", 2 * 2.6 * 32),
    (["avx2"], "bfloat16", "avx2", 2 * 2.6 * 32),  # emulated: no faster than float32
    ([], "float32", "sse", 2 * 2.6 * 4),
])
def test_peak_flops_from_the_cpu_flags(flags, precision, unit, gflops):
    peak = machine.peak_gflops(flags, 2, 2.6, precision)
    assert peak["unit"] == unit
    assert peak["gflops"] == pytest.approx(gflops, abs=0.05)


def test_share_of_peak_and_the_clock(tmp_path):
    # 400 images/s x 0.37 GFLOP = 148 GFLOP/s of 332.8
    assert peer_timing.flop_share(400, 0.37, 332.8) == pytest.approx(0.4447)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2600.000\n")
    assert machine.clock_ghz(str(cpuinfo)) == pytest.approx(2.6)
    cpuinfo.write_text("processor\t: 0\n")
    assert machine.clock_ghz(str(cpuinfo)) is None


def test_percentiles_rates_and_cores_by_hand():
    seconds = [0.004, 0.001, 0.003, 0.002]
    assert timing.percentile_ms(seconds, 50) == pytest.approx(2.5)  # between 2 and 3 ms
    assert timing.percentile_ms(seconds, 99) == pytest.approx(3.97)  # 3 + 0.97 x (4 - 3)
    assert timing.images_per_second(2560, 2.0) == 1280.0
    assert timing.cores_used(3.0, 2.0) == 1.5


def test_ratios_are_medians_of_each_rounds_ratio():
    # rounds: 100/40, 90/60, 150/50 = 2.5, 1.5, 3.0 -> 2.5 (the medians' ratio would be 2.0)
    assert ratios.median_ratio([100, 90, 150], [40, 60, 50]) == 2.5
    with pytest.raises(ValueError, match="3 rounds against 2"):
        ratios.median_ratio([1, 2, 3], [1, 2])


def _per_round(*values):
    return {"per_round": list(values), "median": float(np.median(values))}


def test_ours_over_theirs_by_hand():
    figures = {
        "training": {"rows": {
            "float32": {"ours_concat": {"images_per_second": _per_round(300, 330),
                                        "images_per_cpu_second": _per_round(200, 180)},
                        "ours_dot": {"images_per_second": _per_round(200, 180)},
                        "theirs": {"images_per_second": _per_round(150, 110),
                                   "images_per_cpu_second": _per_round(100, 100)}},
            "bfloat16": {"ours_concat": {"images_per_second": _per_round(500, 520)},
                         "theirs": {"unavailable": "no bf16"}}}},
        "serving": {"rows": {
            "ours": {"p50_ms_batch_1": _per_round(3.0, 4.0),
                     "images_per_second_batch_256": _per_round(1200, 1000),
                     "images_per_cpu_second_batch_256": _per_round(700, 600)},
            "theirs_float32": {"p50_ms_batch_1": _per_round(6.0, 5.0),
                               "images_per_second_batch_256": _per_round(800, 800)},
            "theirs_bfloat16": {"unavailable": "no bf16"}}}}
    assert ratios.ours_over_theirs(figures) == {
        "training.float32.images_per_second.ours_concat_over_theirs": 2.5,  # 2, 3
        "training.float32.images_per_cpu_second.ours_concat_over_theirs": 1.9,  # 2, 1.8
        "training.float32.images_per_second.ours_dot_over_theirs": 1.485,  # 1.333, 1.636
        "serving.p50_ms_batch_1.ours_over_theirs_float32": 0.65,  # 0.5, 0.8
        "serving.images_per_second_batch_256.ours_over_theirs_float32": 1.375}  # 1.5, 1.25


FAKE_PEER = textwrap.dedent("""\
    import json, sys
    log = open(sys.argv[1], "a")
    print(json.dumps({"ready": {"torch": "fake", "threads": 1}}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        log.write(line)
        log.flush()
        if request["op"] == "exit":
            break
        if request["op"] == "die":
            print("the fake peer gives up", file=sys.stderr)
            sys.exit(3)
        if request["op"] == "babble":
            print("not json", flush=True)
            continue
        if request["precision"] == "bfloat16":
            reply = {"unavailable": "no bf16 here"}
        elif request["op"] == "train":
            steps = request["steps"]
            reply = {"seconds": 0.5 * steps, "wall_seconds": 0.5 * steps,
                     "cpu_seconds": 0.75 * steps}
        else:
            seconds = [0.001 * (i + 1) for i in range(request["calls"])]
            reply = {"seconds": seconds, "wall_seconds": sum(seconds),
                     "cpu_seconds": 2 * sum(seconds)}
        print(json.dumps(reply), flush=True)
""")


@pytest.fixture
def fake_peer(tmp_path):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    log = tmp_path / "requests.jsonl"
    return [sys.executable, str(script), str(log)], log


def test_rounds_against_a_fake_peer(fake_peer):
    command, log = fake_peer
    settings = peer_timing.Settings(critics=(), steps=4, batch_size=8, warmup=2,
                                    latency_calls=4, throughput_calls=2, serving_warmup=1)
    training = {"float32": {}, "bfloat16": {}}
    serving = {"ours": {}, "theirs_float32": {}, "theirs_bfloat16": {}}
    with peer_timing.Peer(command) as driven:
        assert driven.info == {"torch": "fake", "threads": 1}
        for round_ in range(2):
            peer_timing.train_round(settings, driven, {}, training, None, round_ == 0)
            peer_timing.serve_round(settings, driven, lambda x: tf.constant(0.0),
                                    tf.zeros([256, 32, 32, 1]), serving, round_ == 0)
    for rows in (*training.values(), serving):
        peer_timing.medians(rows)
    theirs = training["float32"]["theirs"]
    assert theirs["images_per_second"] == _per_round(16.0, 16.0)  # 4 x 8 images in 2 s
    assert theirs["cores_used"]["per_round"] == [1.5, 1.5]
    assert theirs["images_per_cpu_second"]["per_round"] == [10.7, 10.7]  # 32 in 3 CPU s
    assert training["bfloat16"]["theirs"] == {"unavailable": "no bf16 here"}
    row = serving["theirs_float32"]
    assert row["p50_ms_batch_1"]["per_round"] == [2.5, 2.5]  # 1, 2, 3, 4 ms
    assert row["p99_ms_batch_1"]["per_round"] == [3.97, 3.97]
    # 2 calls of 256 images in 1 + 2 ms
    assert row["images_per_second_batch_256"]["median"] == pytest.approx(512 / 0.003, abs=0.1)
    assert row["cores_used_batch_1"]["per_round"] == row["cores_used_batch_256"]["per_round"] \
        == [2.0, 2.0]
    assert row["images_per_cpu_second_batch_256"]["median"] == pytest.approx(512 / 0.006,
                                                                              abs=0.1)
    assert "images_per_cpu_second_batch_1" not in row
    assert serving["theirs_bfloat16"] == {"unavailable": "no bf16 here"}
    ours = serving["ours"]
    assert len(ours["p50_ms_batch_1"]["per_round"]) == 2
    assert ours["p50_ms_batch_1"]["per_round"][0] > 0
    requests = [json.loads(line) for line in log.read_text().splitlines()]
    # warm-up in the first round only; bfloat16 asked once per kind, then known unavailable
    assert [(r["op"], r.get("precision"), r.get("batch_size"), r.get("warmup"))
            for r in requests] == [
        ("train", "float32", 8, 2), ("train", "bfloat16", 8, 2),
        ("serve", "float32", 1, 1), ("serve", "bfloat16", 1, 1),
        ("serve", "float32", 256, 1),
        ("train", "float32", 8, 0), ("serve", "float32", 1, 0), ("serve", "float32", 256, 0),
        ("exit", None, None, None)]


def test_a_peer_that_dies_or_babbles_is_one_line(fake_peer):
    command, _ = fake_peer
    with peer_timing.Peer(command) as driven:
        with pytest.raises(ConfigError, match="not JSON"):
            driven.request("babble")
        with pytest.raises(ConfigError, match=r"exited with code 3 at die: the fake peer "
                                              r"gives up$"):
            driven.request("die")


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "--steps must be >= 1, got 0"),
    (dict(precisions=("float16",)), "--precisions: unknown ['float16']; known: float32, "
                                    "bfloat16"),
    (dict(critics=()), "--critics: none given; known: concat, dot"),
])
def test_bad_flags_are_one_line(change, message):
    with pytest.raises(ConfigError) as raised:
        peer_timing.Settings(**change).check()
    assert str(raised.value) == message


def _driver(python, peer_dir):
    return peer_timing.driver_command(str(python), str(peer_dir), untrained.config().model)


def test_the_driver_refuses_a_folder_without_their_code(tmp_path):
    with pytest.raises(ConfigError, match=r"^--peer_dir=\S+ lacks the authors' code \(sdim.py, "):
        peer_timing.Peer(_driver(sys.executable, tmp_path))


def test_the_driver_refuses_a_python_without_torch(tmp_path):
    for name in peer_driver.THEIR_FILES:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    # a python without site-packages: no torch, whatever this environment holds
    python = tmp_path / "python_without_torch"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(ConfigError, match=r"^--peer_python=\S+ cannot import torch; "):
        peer_timing.Peer(_driver(python, tmp_path))


def test_the_command_line_says_what_is_missing_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.peer", f"--peer_dir={tmp_path}", f"--out={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: --peer_dir={tmp_path} lacks the authors' code (sdim.py, ")
    assert not list(tmp_path.rglob("*.json"))
