"""--mixed_precision=auto measures where bf16 is native and else picks by hardware, and
--jit_compile=auto picks by hardware; explicit values win."""

import json
import pathlib

import numpy as np
import pytest

from pipeline.config import ConfigError, PipelineConfig
from sdim_tf import precision, precision_probe, temporaries

AVX2 = precision.Hardware(frozenset({"sse4_2", "avx2", "fma"}), ())
AVX512_BF16 = precision.Hardware(frozenset({"avx2", "avx512f", "avx512_bf16"}), ())
AMX = precision.Hardware(frozenset({"avx2", "amx_bf16", "amx_tile"}), ())
A100 = precision.Hardware(frozenset({"avx2"}), ((8, 0), (8, 0)))
MIXED_GPUS = precision.Hardware(frozenset({"avx512_bf16"}), ((8, 6), (7, 5)))


@pytest.mark.parametrize("hardware, expected", [
    (AVX2, "float32"), (AVX512_BF16, "bfloat16"), (AMX, "bfloat16"), (A100, "bfloat16"),
    (MIXED_GPUS, "float32")])
def test_auto_follows_native_bf16(hardware, expected):
    chosen, why = precision.resolve("auto", hardware)
    assert chosen == expected and why.startswith("auto: ")


def test_reasons_name_what_decided():
    assert "avx512_bf16" in precision.resolve("auto", AVX512_BF16)[1]
    assert "amx_bf16" in precision.resolve("auto", AMX)[1]
    assert "7.5" in precision.resolve("auto", MIXED_GPUS)[1]  # the GPU that decided it


@pytest.mark.parametrize("hardware", [AVX2, AVX512_BF16, A100])
def test_explicit_precision_wins(hardware):
    assert precision.resolve("float32", hardware) == ("float32", "--mixed_precision=float32")
    assert precision.resolve("bfloat16", hardware)[0] == "bfloat16"


def test_jit_compile_on_gpus_only_by_default():
    assert precision.jit_compile("auto", A100) is True
    assert precision.jit_compile("auto", AVX512_BF16) is False
    assert precision.jit_compile("on", AVX2) is True and precision.jit_compile("off", A100) is False
    with pytest.raises(ValueError, match="jit_compile must be one of auto, on, off"):
        precision.jit_compile("yes", AVX2)


def test_cpu_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n"
                    "\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert precision.cpu_flags(str(info)) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert precision.cpu_model(str(info)) == "AMD EPYC"
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert precision.cpu_model(str(tmp_path / "missing")) == ""


def test_config_validates_precision_and_keys_training_by_it():
    with pytest.raises(ConfigError, match="--mixed_precision must be one of auto, float32, "
                                          "bfloat16, got 'fp16'"):
        PipelineConfig.from_flat(mixed_precision="fp16").resolve()
    with pytest.raises(ConfigError, match="--lr_schedule must be one of constant, cosine"):
        PipelineConfig.from_flat(lr_schedule="step").resolve()
    with pytest.raises(ConfigError, match="--outlier_weight=0.1 needs --model=sdim"):
        PipelineConfig.from_flat(outlier_weight=0.1, model="discriminative").resolve()
    # The precision trained under is part of the train stage's key; how the step is compiled
    # and distributed is not (they change the speed, not what is trained).
    keyed = PipelineConfig.from_flat(mixed_precision="float32", jit_compile="on",
                                     distribute="one_device").resolve().train.flat(True)
    assert keyed["mixed_precision"] == "float32"
    assert "jit_compile" not in keyed and "distribute" not in keyed


def _bfloat16_nodes(saved_model_dir) -> list[str]:
    """Names of the graph's nodes (functions included) with a bfloat16 type attribute."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    bf16 = types_pb2.DT_BFLOAT16
    return [n.name for n in nodes
            if any(a.type == bf16 or bf16 in a.list.type for a in n.attr.values())]


def test_bfloat16_training_exports_a_float32_model(tmp_path, data_dir):
    """Trained under mixed_bfloat16 (recorded in state.json), calibrated and exported in
    float32: no bfloat16 op in the SavedModel, whereas the checkpoint as saved has them."""
    import keras
    import numpy as np

    from pipeline import run
    from pipeline.run_dir import Run, load_checkpoint
    from sdim_tf import publish, serving

    config = PipelineConfig.from_flat(
        dataset="fashion_mnist", epochs=1, train_limit=256, batch_size=64, validation_split=0,
        reject_budget=0, shift_images=0, mixed_precision="bfloat16", data_dir=str(data_dir),
        run_dir=str(tmp_path / "run"), force_export=True,  # a smoke run: whatever the gate
        stages=("ingest", "train", "calibrate", "evaluate", "export"))
    run_dir = run.run(config)
    state = Run(run_dir).model.state()
    assert (state["precision"], state["precision_reason"]) == (
        "bfloat16", "--mixed_precision=bfloat16")
    assert keras.mixed_precision.global_policy().name == "float32"  # reset after training
    exported = pathlib.Path(Run(run_dir).export.record()["path"])
    assert _bfloat16_nodes(exported) == []
    as_saved = load_checkpoint(Run(run_dir).model.best_path)
    assert as_saved.dtype_policy.name == "mixed_bfloat16"
    module = serving.RejectingClassifier(as_saved, np.zeros(10), 1, (28, 28))
    # the encoder as saved: folding its batch norms (sdim_tf.folding) rebuilds it in float32
    control = publish.export(module, tmp_path / "control", "bf16", fold_batch_norm=False)
    assert _bfloat16_nodes(control)  # the scan finds them where they are
    assert _bfloat16_nodes(publish.export(module, tmp_path / "control", "folded")) == []


# --mixed_precision=auto by measurement (sdim_tf.precision_probe), with planted step times.

BATCH = 64
WARMUP_SECONDS = 100.0  # planted for the untimed steps (tracing): never in the figures


class PlantedSteps:
    """`make_step` for precision_probe.measure whose steps advance a fake clock by planted
    seconds, recording the global policy each was built and run under."""

    def __init__(self, seconds: dict[str, list[float]]):
        self.now, self.seconds = 0.0, seconds
        self.built, self.stepped = [], []

    def clock(self) -> float:
        return self.now

    def __call__(self, name):
        import keras

        self.built.append((name, keras.mixed_precision.global_policy().name))
        durations = iter([WARMUP_SECONDS] * precision_probe.WARMUP_STEPS + self.seconds[name])

        def step():
            self.stepped.append((name, keras.mixed_precision.global_policy().name))
            self.now += next(durations)

        return step


def _planted_probe(float32, bfloat16) -> precision_probe.Probe:
    planted = PlantedSteps({"float32": list(float32), "bfloat16": list(bfloat16)})
    return precision_probe.measure(planted, BATCH, clock=planted.clock)


@pytest.mark.parametrize("float32, bfloat16, expected", [
    ([0.40] * 5, [0.25] * 5, "bfloat16"),
    ([0.25] * 5, [0.40] * 5, "float32"),
    ([0.30] * 5, [0.30] * 5, "float32"),  # a tie: the precision that rounds nothing
    # two disturbed steps (a neighbour's load) move the mean, not the median
    ([0.30, 0.31, 0.29, 0.30, 0.30], [0.20, 5.0, 0.21, 0.20, 9.0], "bfloat16"),
    ([0.30, 4.0, 0.30, 0.31, 3.0], [0.32, 0.33, 0.32, 0.32, 0.33], "float32"),
])
def test_auto_picks_the_measured_faster_precision(float32, bfloat16, expected):
    probe = _planted_probe(float32, bfloat16)
    speed = {"float32": BATCH / np.median(float32), "bfloat16": BATCH / np.median(bfloat16)}
    other = "bfloat16" if expected == "float32" else "float32"
    assert speed[expected] >= speed[other]  # the slower one is never picked
    for name, seconds in (("float32", float32), ("bfloat16", bfloat16)):
        assert probe.step_seconds[name] == pytest.approx(seconds)  # no warm-up step among them
        assert probe.images_per_second(name) == pytest.approx(speed[name])
    chosen, why, found = precision_probe.resolve("auto", AVX512_BF16, lambda: probe)
    assert (chosen, found) == (expected, probe)
    assert why == (f"auto: measured {speed[expected]:.0f} img/s {expected} vs "
                   f"{speed[other]:.0f} img/s {other} over 5 steps")
    record = probe.to_json()
    assert record["batch_size"] == BATCH and record["cache"] is None
    assert record[expected]["images_per_second"] == round(speed[expected], 1)
    assert record["float32"]["step_ms"] == pytest.approx([1000 * s for s in float32])


def test_each_precision_is_built_and_timed_under_its_policy_then_the_policy_is_restored():
    import keras

    planted = PlantedSteps({"float32": [0.3] * 5, "bfloat16": [0.2] * 5})
    keras.mixed_precision.set_global_policy("mixed_float16")  # whatever was in force
    try:
        precision_probe.measure(planted, BATCH, clock=planted.clock)
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert planted.built == [("float32", "float32"), ("bfloat16", "mixed_bfloat16")]
    warmup = precision_probe.WARMUP_STEPS
    assert planted.stepped == ([("float32", "float32")] * warmup
                               + [("bfloat16", "mixed_bfloat16")] * warmup
                               + [("float32", "float32"), ("bfloat16", "mixed_bfloat16")] * 5)


class Counted:
    """A `measure` for precision_probe.resolve that counts its calls."""

    def __init__(self, probe=None, error=None):
        self.calls, self.probe, self.error = 0, probe, error

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.error:
            raise self.error
        return self.probe


@pytest.mark.parametrize("hardware", [AVX512_BF16, AMX, A100])
def test_auto_measures_where_bf16_is_native(hardware):
    measure = Counted(_planted_probe([0.2] * 5, [0.3] * 5))
    assert precision_probe.resolve("auto", hardware, measure)[0] == "float32"
    assert measure.calls == 1


@pytest.mark.parametrize("hardware", [AVX2, MIXED_GPUS])
def test_auto_does_not_measure_emulated_bf16(hardware):
    measure = Counted(_planted_probe([0.3] * 5, [0.2] * 5))  # would say bfloat16
    why = precision.resolve("auto", hardware)[1]
    assert precision_probe.resolve("auto", hardware, measure) == (
        "float32", f"{why}; not measured", None)
    assert measure.calls == 0


def test_explicit_precision_and_unmeasured_runs_do_not_measure():
    measure = Counted(_planted_probe([0.2] * 5, [0.3] * 5))
    assert precision_probe.resolve("bfloat16", AVX512_BF16, measure) == (
        "bfloat16", "--mixed_precision=bfloat16", None)
    assert precision_probe.resolve("auto", AVX512_BF16, measure, "--epochs=0 trains nothing") \
        == ("bfloat16", "auto: the CPU does bf16 natively (avx512_bf16); not measured: "
            "--epochs=0 trains nothing", None)
    assert measure.calls == 0


@pytest.mark.parametrize("hardware, expected", [(AVX512_BF16, "bfloat16"), (A100, "bfloat16")])
def test_a_failed_probe_falls_back_to_the_hardware_rule(hardware, expected):
    warnings = []
    measure = Counted(error=RuntimeError("out of memory allocating 2 GiB\n  more detail"))
    chosen, why, probe = precision_probe.resolve("auto", hardware, measure,
                                                 warn=warnings.append)
    by_hardware = precision.resolve("auto", hardware)[1].removeprefix("auto: ")
    assert (chosen, probe, measure.calls) == (expected, None, 1)
    assert why == ("auto: the speed probe failed (RuntimeError: out of memory allocating 2 "
                   f"GiB), so by the hardware: {by_hardware}")
    assert len(warnings) == 1 and "RuntimeError: out of memory" in warnings[0]


# The probe's cache: one JSON file per machine and step settings.

def _key(hardware=AVX512_BF16, **settings) -> dict:
    return precision_probe.machine_key(hardware) | {"batch_size": BATCH, **settings}


EPYC = precision.Hardware(AVX512_BF16.cpu_flags, (), "AMD EPYC 7B13")
XEON = precision.Hardware(AVX512_BF16.cpu_flags, (), "Intel(R) Xeon(R) Platinum 8373C")


def test_the_cache_is_written_reread_and_keyed(tmp_path):
    cache = precision_probe.ProbeCache(tmp_path)
    measure = Counted(_planted_probe([0.40] * 5, [0.25] * 5))
    first = precision_probe.cached(cache, _key(EPYC), measure)
    path = cache.path(_key(EPYC))
    stored = json.loads(path.read_text())
    assert stored["key"]["cpu"] == "AMD EPYC 7B13" and stored["key"]["batch_size"] == BATCH
    assert stored["probe"]["bfloat16"]["step_ms"] == pytest.approx([250.0] * 5)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left

    again = precision_probe.cached(cache, _key(EPYC), measure)
    assert measure.calls == 1  # read, not measured
    assert again.cache == str(path)
    for name in precision_probe.PROBED:  # kept to the microsecond
        assert again.step_seconds[name] == pytest.approx(first.step_seconds[name], abs=1e-6)
    assert again.choice() == ("bfloat16", f"{first.choice()[1]}, cached in {path}")
    assert again.to_json()["cache"] == str(path)

    # another CPU, another batch size, another TensorFlow: misses
    for key in (_key(XEON), _key(EPYC, batch_size=128), _key(EPYC) | {"tensorflow": "0.0"}):
        assert cache.path(key) != path
        precision_probe.cached(cache, key, measure)
    assert measure.calls == 4


@pytest.mark.parametrize("content", [
    "{not json", "", "[]", '{"version": 1}',
    json.dumps({"version": 1, "key": {"cpu": "another"}, "probe": {}}),
    "KEY:" + json.dumps({"float32": {"step_ms": [300.0]}, "bfloat16": {"step_ms": []},
                         "batch_size": BATCH, "measured_at": "x"}),
    "KEY:" + json.dumps({"float32": {"step_ms": [300.0]}, "bfloat16": {"step_ms": [-1.0]},
                         "batch_size": BATCH, "measured_at": "x"}),
])
def test_a_corrupt_cache_is_ignored_with_a_warning(tmp_path, content):
    cache = precision_probe.ProbeCache(tmp_path)
    key = _key()
    path = cache.path(key)
    if content.startswith("KEY:"):  # the right key, a broken probe
        content = json.dumps({"version": 1, "key": key, "probe": json.loads(content[4:])})
    path.parent.mkdir(parents=True)
    path.write_text(content)
    warnings, measure = [], Counted(_planted_probe([0.3] * 5, [0.2] * 5))
    probe = precision_probe.cached(cache, key, measure, warn=warnings.append)
    assert measure.calls == 1 and probe.cache is None
    assert len(warnings) == 1 and warnings[0].startswith(
        f"ignoring the precision probe cache: {path}")
    # measured again and rewritten: the next run reads it without a warning
    assert precision_probe.cached(cache, key, measure, warn=warnings.append).cache == str(path)
    assert measure.calls == 1 and len(warnings) == 1


def test_an_unwritable_cache_costs_a_warning_not_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    warnings, measure = [], Counted(_planted_probe([0.3] * 5, [0.2] * 5))
    cache = precision_probe.ProbeCache(blocker)
    probe = precision_probe.cached(cache, _key(), measure, warn=warnings.append)
    assert probe.choice()[0] == "bfloat16" and measure.calls == 1
    assert len(warnings) == 1 and warnings[0].startswith(
        f"could not cache the precision probe in {cache.path(_key())}")


def test_an_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "probe.json"
    temporaries.replace_atomically(path, lambda f: f.write(b"complete"))

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        temporaries.replace_atomically(path, interrupted)
    assert path.read_bytes() == b"complete" and [p.name for p in tmp_path.iterdir()] == [
        "probe.json"]


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(precision_probe.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert precision_probe.cache_dir() == tmp_path / "home" / ".cache" / "sdim_tf"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the spec: absolute paths only
    assert precision_probe.cache_dir() == tmp_path / "home" / ".cache" / "sdim_tf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert precision_probe.cache_dir() == tmp_path / "xdg" / "sdim_tf"
    monkeypatch.setenv(precision_probe.CACHE_ENV, str(tmp_path / "mine"))
    assert precision_probe.cache_dir() == tmp_path / "mine"


def test_a_resumed_run_keeps_its_precision():
    from pipeline.stages import train

    state = {"precision": "float32", "precision_reason": "auto: measured 312 img/s float32 vs "
             "221 img/s bfloat16 over 5 steps", "precision_probe": {"batch_size": 128}}
    measure = Counted(_planted_probe([0.4] * 5, [0.1] * 5))  # here bfloat16 is faster
    training = PipelineConfig.from_flat().resolve().train
    assert train._precision(training, state, AVX512_BF16, measure) == (
        "float32", state["precision_reason"] + " (when the run started)", {"batch_size": 128})
    assert measure.calls == 0
    chosen, _, probe = train._precision(training, None, AVX512_BF16, measure)
    assert (chosen, probe["batch_size"], measure.calls) == ("bfloat16", BATCH, 1)


# The probe for real: the discriminative model, 1 untimed and 1 timed step per precision, on
# hardware said to have native bf16 (so that it measures on any machine).

def _tiny(tmp_path, **flags):
    return PipelineConfig.from_flat(**{
        "dataset": "fashion_mnist", "model": "discriminative", "epochs": 1, "train_limit": 64,
        "batch_size": 64, "validation_split": 0, "reject_budget": 0, "lr_schedule": "constant",
        "run_dir": str(tmp_path / "run"), **flags}).resolve()


@pytest.fixture
def short_probe(monkeypatch, tmp_path):
    monkeypatch.setattr(precision_probe, "WARMUP_STEPS", 1)
    monkeypatch.setattr(precision_probe, "TIMED_STEPS", 1)
    monkeypatch.setattr(precision.Hardware, "detect", staticmethod(lambda: AVX512_BF16))
    monkeypatch.setenv(precision_probe.CACHE_ENV, str(tmp_path / "cache"))


def test_the_train_stage_records_both_figures_and_a_resumed_run_keeps_them(
        tmp_path, fashion_ingest, short_probe, monkeypatch):
    import keras
    from absl import logging as absl_logging

    from pipeline.run_dir import Examples
    from pipeline.stages import train

    lines = []
    monkeypatch.setattr(absl_logging, "info", lambda fmt, *args: lines.append(fmt % args))
    # the epoch's test accuracy (10,000 test images after the last epoch) is not asked here
    monkeypatch.setattr(train._Loop, "measure", lambda self, epoch, row: None)
    upstream = {"ingest": Examples(fashion_ingest[0])}
    stage = tmp_path / "train"
    train.run(_tiny(tmp_path), stage, upstream)
    state = json.loads((stage / "state.json").read_text())
    figures = state["precision_probe"]
    speed = {}
    for name in ("float32", "bfloat16"):
        (step_ms,) = figures[name]["step_ms"]
        speed[name] = 64 / (step_ms / 1000)
        assert figures[name]["images_per_second"] == pytest.approx(round(speed[name], 1))
    chosen = "bfloat16" if speed["bfloat16"] > speed["float32"] else "float32"
    other = "float32" if chosen == "bfloat16" else "bfloat16"
    why = (f"auto: measured {speed[chosen]:.0f} img/s {chosen} vs {speed[other]:.0f} img/s "
           f"{other} over 1 step")
    assert (state["precision"], state["precision_reason"]) == (chosen, why)
    assert f"train: computing in {chosen} ({why})" in lines
    assert keras.mixed_precision.global_policy().name == "float32"
    (cached,) = (tmp_path / "cache" / "precision_probe").iterdir()
    assert json.loads(cached.read_text())["probe"]["float32"] == figures["float32"]

    # Resumed (a finished run resumes with nothing left to train): nothing measured, though
    # the other precision would now measure faster, and the precision and figures are kept.
    faster_other = _planted_probe([0.4], [0.1]) if chosen == "float32" else \
        _planted_probe([0.1], [0.4])
    monkeypatch.setattr(precision_probe, "measure", Counted(faster_other))
    train.run(_tiny(tmp_path), stage, upstream)
    resumed = json.loads((stage / "state.json").read_text())
    assert precision_probe.measure.calls == 0
    assert [resumed[k] for k in ("precision", "precision_reason", "precision_probe")] == [
        chosen, why, figures]
    assert f"train: computing in {chosen} ({why} (when the run started))" in lines


def test_the_probe_leaves_no_state_behind(tmp_path, fashion_ingest, short_probe):
    """The run's model after the probe starts from the weights --seed gives without it; the
    probe's own models drew from the seeds (without the stage's reseeding they differ)."""
    import keras
    import tensorflow as tf

    from pipeline.run_dir import Examples
    from pipeline.stages import train

    config, examples = _tiny(tmp_path), Examples(fashion_ingest[0])
    keras.utils.set_random_seed(config.train.seed)
    reference = train._new_model(config.model, config.train, examples, 1).get_weights()
    measure = train.speed_probe(config.model, config.train, examples,
                                 tf.distribute.get_strategy(), {"skip": 0, "limit": 64}, 64, 1,
                                 AVX512_BF16)
    probe = measure()
    assert all(probe.images_per_second(name) > 0 for name in precision_probe.PROBED)
    assert keras.mixed_precision.global_policy().name == "float32"
    drifted = train.build_model(config.model, config.train, examples.num_classes, 1, 1)
    assert not all(np.array_equal(a, b) for a, b in zip(reference, drifted.get_weights(),
                                                         strict=True))
    rebuilt = train._new_model(config.model, config.train, examples, 1).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(reference, rebuilt, strict=True))
    assert all(w.dtype == np.float32 for w in rebuilt)
