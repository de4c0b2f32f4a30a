"""A zoo of small ONNX models built in code. Each builder returns a ModelProto; ``save`` writes one to disk."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxshard.models import OPSET, make_model, save, transformer
from onnxshard.models import weight as _w

_model = make_model


def mlp(layers=6, width=16, seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [_w(rng, f"W{i}", width, width), _w(rng, f"b{i}", width)]
        nodes += [h.make_node("MatMul", [x, f"W{i}"], [f"mm{i}"]), h.make_node("Add", [f"mm{i}", f"b{i}"], [f"a{i}"])]
        nodes.append(h.make_node("Relu", [f"a{i}"], [f"h{i}"]))
        x = f"h{i}"
    nodes[-1].output[0] = "y"
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", width])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", width])], inits)


def cnn(seed=0):
    """Stem conv, two parallel branches (3x3 and 1x1) joined by Concat and Add, pooled classifier head."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "c0", 8, 3, 3, 3), _w(rng, "c0b", 8), _w(rng, "ca", 8, 8, 3, 3), _w(rng, "cb", 8, 8, 1, 1),
             _w(rng, "cc", 16, 16, 3, 3), _w(rng, "fc", 10, 16), _w(rng, "fcb", 10)]
    nodes = [h.make_node("Conv", ["img", "c0", "c0b"], ["s0"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["s0"], ["s1"]),
             h.make_node("Conv", ["s1", "ca"], ["ba"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["ba"], ["ba1"]),
             h.make_node("Conv", ["s1", "cb"], ["bb"]),
             h.make_node("Sigmoid", ["bb"], ["bb1"]),
             h.make_node("Concat", ["ba1", "bb1"], ["cat"], axis=1),
             h.make_node("Conv", ["cat", "cc"], ["cc1"], pads=[1, 1, 1, 1]),
             h.make_node("Add", ["cc1", "cat"], ["sum"]),
             h.make_node("Relu", ["sum"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["gap"]),
             h.make_node("Flatten", ["gap"], ["flat"]),
             h.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], transB=1)]
    return _model(nodes, [h.make_tensor_value_info("img", T.FLOAT, ["batch", 3, 8, 8])],
                  [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 10])], inits)


def control_flow(seed=0):
    """Nested If, a Loop and a Scan whose bodies read outer-scope tensors and initializers."""
    rng = np.random.default_rng(seed)
    W = _w(rng, "W", 8, 8)
    inits = [W, _w(rng, "Wl", 8, 8), _w(rng, "Ws", 8, 8), nh.from_array(np.array(3, np.int64), "trips"),
             nh.from_array(np.array(0.0, np.float32), "zero")]
    # Nested If: inner branches read `a` (outer scope, two levels up) and `W` (outer initializer).
    inner_then = h.make_graph([h.make_node("MatMul", ["a", "W"], ["it"])], "inner_then", [],
                              [h.make_tensor_value_info("it", T.FLOAT, None)])
    inner_else = h.make_graph([h.make_node("Neg", ["a"], ["ie"])], "inner_else", [],
                              [h.make_tensor_value_info("ie", T.FLOAT, None)])
    outer_then = h.make_graph([h.make_node("ReduceMean", ["a"], ["m2"], keepdims=0),
                               h.make_node("Greater", ["m2", "zero"], ["c2"]),
                               h.make_node("If", ["c2"], ["inner"], then_branch=inner_then, else_branch=inner_else)],
                              "outer_then", [], [h.make_tensor_value_info("inner", T.FLOAT, None)])
    outer_else = h.make_graph([h.make_node("Add", ["a", "b"], ["oe"])], "outer_else", [],
                              [h.make_tensor_value_info("oe", T.FLOAT, None)])
    # Loop body reads `c` and `Wl` from outside: acc = tanh(acc @ Wl + c)
    loop_body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]),
         h.make_node("MatMul", ["acc_in", "Wl"], ["lm"]),
         h.make_node("Add", ["lm", "c"], ["la"]),
         h.make_node("Tanh", ["la"], ["acc_out"])],
        "loop_body",
        [h.make_tensor_value_info("iter", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("acc_in", T.FLOAT, None)],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, None)])
    # Scan over the batch rows; body reads `Ws` and `d` (outer).
    scan_body = h.make_graph(
        [h.make_node("MatMul", ["row", "Ws"], ["sm"]), h.make_node("Add", ["sm", "state_in"], ["state_out"]),
         h.make_node("Mul", ["state_out", "dmean"], ["scan_row"])],
        "scan_body",
        [h.make_tensor_value_info("state_in", T.FLOAT, [8]), h.make_tensor_value_info("row", T.FLOAT, [8])],
        [h.make_tensor_value_info("state_out", T.FLOAT, [8]), h.make_tensor_value_info("scan_row", T.FLOAT, [8])])
    nodes = [h.make_node("Relu", ["x"], ["a"]),
             h.make_node("Sigmoid", ["x"], ["b"]),
             h.make_node("Tanh", ["x"], ["c"]),
             h.make_node("Abs", ["x"], ["d"]),
             h.make_node("ReduceMean", ["d"], ["dmean"], keepdims=0),
             h.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
             h.make_node("Greater", ["sx", "zero"], ["cond"]),
             h.make_node("If", ["cond"], ["iff"], then_branch=outer_then, else_branch=outer_else),
             h.make_node("Loop", ["trips", "", "iff"], ["looped"], body=loop_body),
             h.make_node("Identity", ["zero8"], ["init_state"]),
             h.make_node("Scan", ["init_state", "looped"], ["final_state", "scanned"], body=scan_body,
                         num_scan_inputs=1),
             h.make_node("Add", ["scanned", "looped"], ["y"])]
    inits.append(nh.from_array(np.zeros(8, np.float32), "zero8"))
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8]),
                   h.make_tensor_value_info("final_state", T.FLOAT, [8])], inits)


def local_function(seed=0):
    """Nodes calling a model-local function that calls another local function."""
    rng = np.random.default_rng(seed)
    inner = h.make_function("custom.fn", "Swish", ["X"], ["Y"],
                            [h.make_node("Sigmoid", ["X"], ["S"]), h.make_node("Mul", ["X", "S"], ["Y"])],
                            [h.make_opsetid("", OPSET)])
    outer = h.make_function("custom.fn", "SwishPlus", ["X", "B"], ["Y"],
                            [h.make_node("Swish", ["X"], ["S"], domain="custom.fn"), h.make_node("Add", ["S", "B"], ["Y"])],
                            [h.make_opsetid("", OPSET), h.make_opsetid("custom.fn", 1)])
    inits = [_w(rng, "W0", 8, 8), _w(rng, "W1", 8, 8), _w(rng, "B", 8)]
    nodes = [h.make_node("MatMul", ["x", "W0"], ["m0"]),
             h.make_node("SwishPlus", ["m0", "B"], ["f0"], domain="custom.fn"),
             h.make_node("MatMul", ["f0", "W1"], ["m1"]),
             h.make_node("Swish", ["m1"], ["f1"], domain="custom.fn"),
             h.make_node("Relu", ["f1"], ["r"]),
             h.make_node("SwishPlus", ["r", "B"], ["y"], domain="custom.fn")]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8])], inits, functions=[outer, inner],
                  opsets=[h.make_opsetid("custom.fn", 1)])


def multi_io(seed=0):
    """Two inputs, an early graph output, a skip from the first node to the last, and a shared initializer."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, "Wshared", 8, 8), _w(rng, "W1", 8, 8), _w(rng, "W2", 8, 8)]
    nodes = [h.make_node("MatMul", ["x1", "Wshared"], ["s0"]),
             h.make_node("Add", ["s0", "x2"], ["early"]),
             h.make_node("Relu", ["early"], ["r1"]),
             h.make_node("MatMul", ["r1", "W1"], ["m1"]),
             h.make_node("Tanh", ["m1"], ["t1"]),
             h.make_node("MatMul", ["t1", "W2"], ["m2"]),
             h.make_node("Sigmoid", ["m2"], ["t2"]),
             h.make_node("MatMul", ["t2", "Wshared"], ["m3"]),
             h.make_node("Add", ["m3", "s0"], ["skip"]),
             h.make_node("Mul", ["skip", "x2"], ["out"]),
             h.make_node("ReduceSum", ["out"], ["total"], keepdims=0)]
    return _model(nodes, [h.make_tensor_value_info("x1", T.FLOAT, ["batch", 8]),
                          h.make_tensor_value_info("x2", T.FLOAT, ["batch", 8])],
                  [h.make_tensor_value_info("out", T.FLOAT, ["batch", 8]),
                   h.make_tensor_value_info("early", T.FLOAT, ["batch", 8]),
                   h.make_tensor_value_info("total", T.FLOAT, [])], inits)


def constant_weights(seed=0):
    """Paddle-style: every weight is a Constant node, all listed at the top of the graph."""
    rng = np.random.default_rng(seed)
    nodes = [h.make_node("Constant", [], [f"K{i}"], value=_w(rng, f"k{i}", 8, 8)) for i in range(4)]
    x = "x"
    for i in range(4):
        nodes += [h.make_node("MatMul", [x, f"K{i}"], [f"m{i}"]), h.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        x = f"t{i}"
    nodes[-1].output[0] = "y"
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", 8])])


def failing_gather():
    """Stage 1 gathers rows of a table with indices from the input: out-of-range indices make ORT raise."""
    table = nh.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Tanh", ["r"], ["t"]),
             h.make_node("Gather", ["table", "idx"], ["g"]), h.make_node("Add", ["t", "g"], ["y"])]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4]),
                          h.make_tensor_value_info("idx", T.INT64, ["batch"])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])], [table])


def batch_coupled(axis=0, width=8, seed=0):
    """Centres each column over ``axis`` (``axis=0``: over the batch, so a sample's result depends on the others in
    its batch), then a linear layer."""
    rng = np.random.default_rng(seed)
    nodes = [h.make_node("ReduceMean", ["x"], ["mean"], axes=[axis], keepdims=1, name="batch_mean"),
             h.make_node("Sub", ["x", "mean"], ["c"]), h.make_node("MatMul", ["c", "W"], ["y"])]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", width])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", width])], [_w(rng, "W", width, width)])


ZOO = {
    "mlp": mlp,
    "transformer": transformer,
    "transformer_contrib": lambda: transformer(gelu_contrib=True),
    "embedding_transformer": lambda: transformer(vocab=50),
    "cnn": cnn,
    "control_flow": control_flow,
    "local_function": local_function,
    "multi_io": multi_io,
    "constant_weights": constant_weights,
}

__all__ = ["ZOO", "save"]


def typed_io(width=16, seed=0):
    """Inputs and outputs of several element types (the serving protocol's datatypes): FP32 through an MLP with
    a BOOL mask, INT64 ids, and STRING labels passed through to the last stage."""
    rng = np.random.default_rng(seed)
    inits = [_w(rng, f"W{i}", width, width) for i in range(4)] + [nh.from_array(np.array(1, np.int64), "one")]
    nodes = [h.make_node("Cast", ["mask"], ["maskf"], to=T.FLOAT), h.make_node("Mul", ["x", "maskf"], ["xm"])]
    a = "xm"
    for i in range(4):
        nodes += [h.make_node("MatMul", [a, f"W{i}"], [f"m{i}"]), h.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        a = f"t{i}"
    nodes += [h.make_node("Identity", [a], ["y"]), h.make_node("Add", ["ids", "one"], ["next_ids"]),
              h.make_node("Not", ["mask"], ["unmasked"]), h.make_node("Identity", ["label"], ["label_out"])]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["batch", width]),
                          h.make_tensor_value_info("mask", T.BOOL, ["batch", width]),
                          h.make_tensor_value_info("ids", T.INT64, ["batch", 4]),
                          h.make_tensor_value_info("label", T.STRING, ["batch"])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["batch", width]),
                   h.make_tensor_value_info("next_ids", T.INT64, ["batch", 4]),
                   h.make_tensor_value_info("unmasked", T.BOOL, ["batch", width]),
                   h.make_tensor_value_info("label_out", T.STRING, ["batch"])], inits)
