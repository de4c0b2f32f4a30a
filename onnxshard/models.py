"""Models built in code, for the demo and benchmarks (and the test zoo). No downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

OPSET = 17


def weight(rng, name, *shape, scale=0.2):
    return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def make_model(nodes, inputs, outputs, inits=(), functions=(), opsets=()):
    graph = h.make_graph(nodes, "onnxshard_model", inputs, outputs, list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), *opsets], functions=list(functions))
    model.ir_version = 10
    return model


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx", external: bool = False) -> Path:
    """Write ``model`` to ``folder/name``; with ``external``, tensors over 128 bytes go to ``name.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=name + ".data", size_threshold=128)
    else:
        onnx.save(model, str(path))
    return path


def transformer(layers=2, d=32, heads=4, ffn=64, seed=0, vocab=None, gelu_contrib=False):
    """Pre-LN transformer blocks with an additive attention mask; ``vocab`` adds an embedding Gather."""
    rng = np.random.default_rng(seed)
    hd = d // heads
    nodes, inits = [], []
    if vocab:
        inits.append(weight(rng, "embed", vocab, d))
        nodes.append(h.make_node("Gather", ["embed", "ids"], ["x"]))
        inputs = [h.make_tensor_value_info("ids", T.INT64, ["batch", "seq"])]
    else:
        inputs = [h.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", d])]
    inputs.append(h.make_tensor_value_info("mask", T.FLOAT, ["batch", "seq"]))
    inits += [nh.from_array(np.array([0, 0, heads, hd], np.int64), "split_heads"),
              nh.from_array(np.array([0, 0, d], np.int64), "merge_heads"),
              nh.from_array(np.array([1, 2], np.int64), "mask_axes"),
              nh.from_array(np.array(-1e4, np.float32), "neg"),
              nh.from_array(np.array(1.0 / np.sqrt(hd), np.float32), "scale")]
    nodes += [h.make_node("Unsqueeze", ["mask", "mask_axes"], ["mask4"]),
              h.make_node("Sub", ["mask4", "one"], ["inv"]),
              h.make_node("Mul", ["inv", "neg"], ["bias"])]
    inits.append(nh.from_array(np.array(1.0, np.float32), "one"))
    x = "x"
    for i in range(layers):
        p = f"l{i}."
        inits += [nh.from_array(np.ones(d, np.float32), p + "ln1_g"), nh.from_array(np.zeros(d, np.float32), p + "ln1_b"),
                  nh.from_array(np.ones(d, np.float32), p + "ln2_g"), nh.from_array(np.zeros(d, np.float32), p + "ln2_b")]
        for w in ("q", "k", "v", "o"):
            inits += [weight(rng, p + w, d, d), weight(rng, p + w + "_b", d)]
        inits += [weight(rng, p + "fc1", d, ffn), weight(rng, p + "fc1_b", ffn), weight(rng, p + "fc2", ffn, d),
                  weight(rng, p + "fc2_b", d)]
        nodes.append(h.make_node("LayerNormalization", [x, p + "ln1_g", p + "ln1_b"], [p + "n1"], axis=-1))
        for w in ("q", "k", "v"):
            nodes += [h.make_node("MatMul", [p + "n1", p + w], [p + w + "m"]),
                      h.make_node("Add", [p + w + "m", p + w + "_b"], [p + w + "a"]),
                      h.make_node("Reshape", [p + w + "a", "split_heads"], [p + w + "r"])]
        nodes += [h.make_node("Transpose", [p + "qr"], [p + "qt"], perm=[0, 2, 1, 3]),
                  h.make_node("Transpose", [p + "kr"], [p + "kt"], perm=[0, 2, 3, 1]),
                  h.make_node("Transpose", [p + "vr"], [p + "vt"], perm=[0, 2, 1, 3]),
                  h.make_node("MatMul", [p + "qt", p + "kt"], [p + "s"]),
                  h.make_node("Mul", [p + "s", "scale"], [p + "ss"]),
                  h.make_node("Add", [p + "ss", "bias"], [p + "sm"]),
                  h.make_node("Softmax", [p + "sm"], [p + "pr"], axis=-1),
                  h.make_node("MatMul", [p + "pr", p + "vt"], [p + "ctx"]),
                  h.make_node("Transpose", [p + "ctx"], [p + "ct"], perm=[0, 2, 1, 3]),
                  h.make_node("Reshape", [p + "ct", "merge_heads"], [p + "cm"]),
                  h.make_node("MatMul", [p + "cm", p + "o"], [p + "om"]),
                  h.make_node("Add", [p + "om", p + "o_b"], [p + "oa"]),
                  h.make_node("Add", [x, p + "oa"], [p + "res1"]),
                  h.make_node("LayerNormalization", [p + "res1", p + "ln2_g", p + "ln2_b"], [p + "n2"], axis=-1),
                  h.make_node("MatMul", [p + "n2", p + "fc1"], [p + "f1"]),
                  h.make_node("Add", [p + "f1", p + "fc1_b"], [p + "f1b"])]
        if gelu_contrib:
            nodes.append(h.make_node("Gelu", [p + "f1b"], [p + "g"], domain="com.microsoft"))
        else:
            nodes.append(h.make_node("Relu", [p + "f1b"], [p + "g"]))
        nodes += [h.make_node("MatMul", [p + "g", p + "fc2"], [p + "f2"]),
                  h.make_node("Add", [p + "f2", p + "fc2_b"], [p + "f2b"]),
                  h.make_node("Add", [p + "res1", p + "f2b"], [p + "out"])]
        x = p + "out"
    nodes.append(h.make_node("Identity", [x], ["y"]))
    opsets = [h.make_opsetid("com.microsoft", 1)] if gelu_contrib else []
    return make_model(nodes, inputs, [h.make_tensor_value_info("y", T.FLOAT, ["batch", "seq", d])], inits, opsets=opsets)


def lstm(layers=4, inputs=64, hidden=256, seed=0):
    """A stacked LSTM over ``x[seq, batch, inputs]`` (ONNX's time-major layout): the batch is axis 1."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, width = [], [], "x", inputs
    inits.append(nh.from_array(np.array([1], np.int64), "axis1"))
    for i in range(layers):
        inits += [weight(rng, f"W{i}", 1, 4 * hidden, width, scale=0.1),
                  weight(rng, f"R{i}", 1, 4 * hidden, hidden, scale=0.1), weight(rng, f"B{i}", 1, 8 * hidden, scale=0.1)]
        nodes += [h.make_node("LSTM", [x, f"W{i}", f"R{i}", f"B{i}"], [f"y{i}"], hidden_size=hidden),
                  h.make_node("Squeeze", [f"y{i}", "axis1"], [f"h{i}"])]
        x, width = f"h{i}", hidden
    nodes[-1].output[0] = "y"
    return make_model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["seq", "batch", inputs])],
                      [h.make_tensor_value_info("y", T.FLOAT, ["seq", "batch", hidden])], inits)
