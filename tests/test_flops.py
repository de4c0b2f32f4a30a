"""The cost model's FLOP formulas (pure, no ONNX Runtime): recurrent layers, contrib attention, Einsum, and the
note a plan carries for ops it has no formula for."""

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h

import onnxshard
from onnxshard import models
from onnxshard.partitioner.flops import node_flops, unpriced
from onnxshard.plans import TensorSpec


def _specs(**shapes):
    return {name: TensorSpec(name, "float32", shape) for name, shape in shapes.items()}


def test_a_recurrent_layer_counts_every_gate_of_every_step():
    for gates, op, hidden in ((4, "LSTM", 256), (4, "LSTM", 128), (3, "GRU", 256), (1, "RNN", 64)):
        node = h.make_node(op, ["x", "w", "r"], ["y"], hidden_size=hidden)
        specs = _specs(x=("seq", "batch", 64), w=(1, gates * hidden, 64), r=(1, gates * hidden, hidden),
                       y=("seq", 1, "batch", hidden))
        want = 2.0 * 10 * 4 * gates * hidden * (64 + hidden)
        assert node_flops(node, specs, {"seq": 10, "batch": 4}) == want, op
    # the quantized contrib layer real exports use, with its transposed int8 weights: the same products
    node = h.make_node("DynamicQuantizeLSTM", ["x", "w", "r"], ["y"], domain="com.microsoft", hidden_size=32)
    specs = _specs(x=(5, 2, 16), w=(2, 16, 128), r=(2, 32, 128), y=(5, 2, 2, 32))
    assert node_flops(node, specs, {}) == 2.0 * 10 * (2 * 16 * 128 + 2 * 32 * 128)


def test_contrib_attention_counts_the_projection_and_both_score_products():
    node = h.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=4)
    specs = _specs(x=("batch", "seq", 64), w=(64, 192), y=("batch", "seq", 64))
    flops = node_flops(node, specs, {"batch": 2, "seq": 8})
    assert flops == 2.0 * 16 * 64 * 192 + 4.0 * 16 * 8 * 64
    assert node_flops(node, specs, {"batch": 2, "seq": 16}) > 2 * flops  # the scores grow with seq squared
    mha = h.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4)
    specs = _specs(q=(2, 8, 64), k=(2, 32, 64), v=(2, 32, 64), y=(2, 8, 64))
    assert node_flops(mha, specs, {}) == 4.0 * 16 * 32 * 64


def test_einsum_counts_every_index_combination():
    node = h.make_node("Einsum", ["a", "b"], ["c"], equation="bij,bjk->bik")
    specs = _specs(a=(3, 4, 5), b=(3, 5, 6), c=(3, 4, 6))
    assert node_flops(node, specs, {}) == 2.0 * 3 * 4 * 5 * 6
    node = h.make_node("Einsum", ["a"], ["c"], equation="...ij->...ji")
    assert node_flops(node, _specs(a=(2, 3, 4), c=(2, 4, 3)), {}) == 24  # ellipsis: one per output element


def test_a_plan_names_the_ops_its_costs_only_guess(save_model, tmp_path):
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"]),
             h.make_node("Gelu", ["m"], ["g"], domain="com.microsoft"),  # has a formula: no note
             h.make_node("Relu", ["g"], ["y"])]
    model = models.make_model(nodes, [h.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                              [h.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])], [w],
                              opsets=[h.make_opsetid("com.microsoft", 1)])
    assert onnxshard.plan(save_model(model, name="known"), tmp_path / "known-plan").stages[0].notes == ()
    custom = h.make_node("Irfft", ["m"], ["g"], domain="com.microsoft")  # one ORT has, with no formula here
    assert unpriced([custom, *nodes]) == {"com.microsoft.Irfft": 1}
    model.graph.node[1].CopyFrom(h.make_node("Sinc", ["m"], ["g"], domain="my.ops"))
    model.opset_import.append(h.make_opsetid("my.ops", 1))
    notes = onnxshard.plan(save_model(model, name="custom"), tmp_path / "custom-plan", allow_domains=["my.ops"]).stages[0].notes
    assert notes == ("cost model: no FLOP formula for my.ops.Sinc (1 node); counted as one operation per output "
                     "element, so this cut may be unbalanced: plan with --profile to measure them",)
