"""--mixed_precision=auto and --jit_compile=auto pick by hardware; explicit values win."""

import pathlib

import pytest

from pipeline.config import ConfigError, PipelineConfig
from sdim_tf import precision

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
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


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
    control = publish.export(serving.RejectingClassifier(as_saved, np.zeros(10), 1, (28, 28)),
                             tmp_path / "control", "bf16")
    assert _bfloat16_nodes(control)  # the scan finds them where they are
