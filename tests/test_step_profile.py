"""bench.step_profile: the trace's kernels and their shares against a hand-built XSpace, the
model part of op names by hand, and a real trace of a small SDIM's steps."""

import keras
import pytest
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

import sdim_tf
from bench import step_profile, timing

MS = 10**9  # picoseconds


def _space() -> xplane_pb2.XSpace:
    """Two executor threads, a tf.data thread, an intra-op pool thread and a device plane,
    durations in milliseconds:

    tf_Compute/1: ExecutorState::Process [0, 200) holding
        the stem conv [10, 90) = 80 (holding a ParallelFor [20, 85), its own work), then
        a function call [100, 140) = 40 holding a critic conv [102, 122) = 20 and an Adam
        update [125, 135) = 10: the call's own time is 40 - 20 - 10 = 10
    tf_Compute/2: AddN_5 [0, 40) = 40, then a batch norm mean [40, 70) = 30 (it starts where
        the AddN ends: not nested)
    tf_data_iterator_get_next: the step reading its batch [0, 10) = 10
    tf_data_iterator_resource: Iterator::Root::Prefetch [0, 50) (a tf.data event: not a kernel)
    tf_numa_-1_Eigen: a thread-pool region [20, 85) (the conv's shards: not counted again)
    /device:GPU:0: a conv of 1000 ms (not the host's)

    Kernel time 80 + 10 + 20 + 10 + 40 + 30 + 10 = 200 ms.
    """
    space = xplane_pb2.XSpace()
    host = space.planes.add(name=step_profile.HOST_PLANE)
    names = {  # id: (name, display name)
        1: ("ExecutorState::Process", ""),
        2: ("encoder_1/stem_conv_1/convolution:_MklNativeConv2D", "_MklNativeConv2D"),
        3: ("ParallelFor", ""),
        4: ("StatefulPartitionedCall:StatefulPartitionedCall", "StatefulPartitionedCall"),
        5: ("critic_1/conv1_1/Relu:_MklNativeFusedConv2D", "_MklNativeFusedConv2D"),
        6: ("adam/Sub_3:Sub", "Sub"),
        7: ("AddN_5:AddN", "AddN"),
        8: ("gradient_tape/encoder_1/stem_bn_1/moments/mean:Mean", "Mean"),
        9: (step_profile.GET_NEXT, ""),
        10: ("Iterator::Root::Prefetch", "Iterator::Prefetch"),
        11: ("ThreadpoolListener::StartRegion", ""),
    }
    for i, (name, display) in names.items():
        host.event_metadata[i].id = i
        host.event_metadata[i].name = name
        host.event_metadata[i].display_name = display

    def line(name, *events):
        added = host.lines.add(name=name)
        for meta, start, end in events:
            added.events.add(metadata_id=meta, offset_ps=start * MS,
                             duration_ps=(end - start) * MS)

    # events out of time order, as a trace may list them
    line("tf_Compute/1", (5, 102, 122), (1, 0, 200), (2, 10, 90), (3, 20, 85), (4, 100, 140),
         (6, 125, 135))
    line("tf_Compute/2", (8, 40, 70), (7, 0, 40))
    line("tf_data_iterator_get_next/3", (9, 0, 10))
    line("tf_data_iterator_resource/4", (10, 0, 50), (10, 5, 45))
    line("tf_numa_-1_Eigen/5", (11, 20, 85))
    device = space.planes.add(name="/device:GPU:0")
    device.event_metadata[1].name = "encoder_1/stem_conv_1/convolution:Conv2D"
    device.event_metadata[1].display_name = "Conv2D"
    device.lines.add(name="stream").events.add(metadata_id=1, duration_ps=1000 * MS)
    return space


def test_kernels_count_each_kernel_once_by_its_self_time():
    found = {k.name: (k.op_type, k.picoseconds / MS) for k in step_profile.kernels(_space())}
    assert found == {
        "encoder_1/stem_conv_1/convolution": ("_MklNativeConv2D", 80),
        "StatefulPartitionedCall": ("StatefulPartitionedCall", 10),  # 40 - 20 - 10
        "critic_1/conv1_1/Relu": ("_MklNativeFusedConv2D", 20),
        "adam/Sub_3": ("Sub", 10),
        "AddN_5": ("AddN", 40),
        "gradient_tape/encoder_1/stem_bn_1/moments/mean": ("Mean", 30),
        "IteratorGetNext": ("IteratorGetNext", 10)}


def test_summary_shares_by_hand(tmp_path):
    # the profiler's layout: <logdir>/plugins/profile/<run>/<host>.xplane.pb
    written = tmp_path / "plugins" / "profile" / "run" / "host.xplane.pb"
    written.parent.mkdir(parents=True)
    written.write_bytes(_space().SerializeToString())
    found = step_profile.kernels(step_profile.read_trace(tmp_path))
    # 200 ms of kernels in 2 steps of 0.16 s wall time together
    figures = step_profile.summarize(found, wall_seconds=0.16, steps=2, top=3)
    assert figures["kernel_ms_per_step"] == 100.0  # 200 ms / 2
    assert figures["kernel_over_wall"] == 1.25  # 0.2 s / 0.16 s
    assert figures["parts"] == {
        "encoder_convolutions": 0.4,  # the stem conv, 80 / 200
        "gradient_sums": 0.2,  # AddN_5, 40 / 200
        "batch_norm": 0.15,  # the stem batch norm's gradient, 30 / 200
        "mi_critic": 0.1,  # 20 / 200
        "losses_and_metrics": 0.05,  # the unscoped call's own 10 ms
        "optimizer": 0.05,  # 10 / 200
        "input": 0.05}  # 10 / 200
    # the 3 largest op types, then the rest: 20 + 10 + 10 + 10 = 50 ms
    assert figures["op_types"] == {"_MklNativeConv2D": 0.4, "AddN": 0.2, "Mean": 0.15,
                                   "other": 0.25}


def test_read_trace_wants_one_trace(tmp_path):
    with pytest.raises(RuntimeError, match="expected one"):
        step_profile.read_trace(tmp_path)


@pytest.mark.parametrize("name, op_type, expected", [
    ("encoder_1/stem_conv_1/convolution", "_MklNativeConv2D", "encoder_convolutions"),
    ("gradient_tape/encoder_1/stage2_block1_1/conv1_1/convolution/Conv2DBackpropFilter",
     "_MklNativeConv2DBackpropFilter", "encoder_convolutions"),
    ("encoder_1/stage1_block1_1/bn1_1/moments/mean", "Mean", "batch_norm"),
    ("gradient_tape/encoder_1/stem_bn_1/moments/GatherV2", "GatherV2", "batch_norm"),
    ("encoder_1/fc_bn_1/batchnorm/mul_2", "Mul", "batch_norm"),
    ("critic_1/local_net_1/bn_1/moments/mean", "Mean", "batch_norm"),  # the dot critic's
    ("gradient_tape/encoder_1/stage3_block1_1/strided_slice/StridedSliceGrad",
     "StridedSliceGrad", "encoder_other"),  # the shortcut's subsampling
    ("encoder_1/stage4_block1_1/Pad", "Pad", "encoder_other"),
    ("encoder_1/fc_1/BiasAdd", "BiasAdd", "encoder_other"),
    ("encoder_1/Relu_1", "Relu", "encoder_other"),
    ("critic_1/conv2_1/Relu", "_MklNativeFusedConv2D", "mi_critic"),
    ("gradient_tape/critic_1/Slice_1", "Slice", "mi_critic"),
    ("class_conditional_1/MultivariateNormalDiag/log_prob/add", "AddV2", "gaussian_head"),
    ("adam/Sub_47", "Sub", "optimizer"),
    ("AddN_5", "AddN", "gradient_sums"),
    ("AddN_3/inputs_1", "UnsortedSegmentSum", "gradient_sums"),
    ("ArithmeticOptimizer/AddOpsRewrite_add_3", "AddN", "losses_and_metrics"),
    ("Softplus_1", "Softplus", "losses_and_metrics"),
    ("div_no_nan_5/ReadVariableOp", "ReadVariableOp", "losses_and_metrics"),
    ("IteratorGetNext", "IteratorGetNext", "input"),
])
def test_part_of_op_names(name, op_type, expected):
    assert step_profile.part(name, op_type) == expected


def test_part_follows_the_optimizers_name():
    # a second Adam in one process is named adam_1 and its ops sit under adam_1/
    assert step_profile.part("adam_1/Sqrt_16", "Sqrt", optimizer="adam_1") == "optimizer"
    assert step_profile.part("adam/Sqrt_16", "Sqrt", optimizer="adam_1") == "optimizer"
    assert step_profile.part("adam/Sqrt_16", "Sqrt", optimizer="sgd") == "losses_and_metrics"


def test_read_through_counts_the_images_and_the_first_batch():
    dataset = tf.data.Dataset.from_tensor_slices((tf.zeros([10, 2]), tf.zeros([10]))).batch(4)
    read = timing.read_through(dataset)
    assert (read["images"], read["first_batch_images"]) == (10, 4)  # batches of 4, 4, 2
    assert 0 <= read["first_batch_seconds"] <= read["seconds"]


def test_real_trace_of_a_small_sdim():
    model = sdim_tf.SDIM(10, filters=(4, 8, 8, 8), rep_dim=8, critic_units=8)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    figures = step_profile.profile_steps(model, timing.random_batches(8), steps=2, warmup=1)
    parts = figures["parts"]
    assert {"encoder_convolutions", "batch_norm", "encoder_other", "mi_critic",
            "gaussian_head", "optimizer"} <= set(parts) <= set(step_profile.PARTS)
    assert sum(parts.values()) == pytest.approx(1, abs=1e-3)  # 4-place rounding
    assert sum(figures["op_types"].values()) == pytest.approx(1, abs=1e-3)
    assert figures["kernel_ms_per_step"] > 0
