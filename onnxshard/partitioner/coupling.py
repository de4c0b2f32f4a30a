"""Nodes whose result for one sample depends on the other samples of the batch ("batch-coupled").

Micro-batching and dynamic batching assume each sample's result is its own. Some models break that: dynamic
quantization computes its scale over the whole tensor (``DynamicQuantizeLinear``, ``com.microsoft``
``DynamicQuantizeLSTM`` / ``DynamicQuantizeMatMul``), and reductions, normalisations and orderings along the batch
axis mix samples (``ReduceMean`` over axis 0, ``Softmax`` over the batch, ``MeanVarianceNormalization`` with its
default axes, ``BatchNormalization`` in training mode, ``TopK``/``CumSum``/``ArgMax`` along the batch). For each
symbolic dim of the model's inputs, :func:`batch_coupled` lists the nodes that couple samples along it, so the
pipeline can say so when it cuts or joins batches along that dim. Inside If/Loop/Scan bodies only the
whole-tensor ops are found (their values' shapes are not known there), attributed to every batch dim of what the
control-flow node reads.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from onnxshard.partitioner.graph import Graph
from onnxshard.partitioner.model import is_external
from onnxshard.plans import TensorSpec

WHOLE_TENSOR = {  # the op's scale or statistics come from every element: any batch dim couples
    ("", "DynamicQuantizeLinear"): "computes its quantization scale over the whole tensor",
    ("com.microsoft", "DynamicQuantizeLSTM"): "quantizes its input with one scale over the whole tensor",
    ("com.microsoft", "DynamicQuantizeMatMul"): "quantizes its input with one scale over the whole tensor",
}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
          "ReduceLogSumExp", "ReduceSumSquare"}
ONE_AXIS = {  # op: (attribute, default axis, what it does along it)
    "ArgMax": ("axis", 0, "picks the largest"), "ArgMin": ("axis", 0, "picks the smallest"),
    "Softmax": ("axis", -1, "normalises"), "LogSoftmax": ("axis", -1, "normalises"),
    "Hardmax": ("axis", -1, "picks the largest"), "TopK": ("axis", -1, "orders"),
    "LpNormalization": ("axis", -1, "normalises"),
}


def batch_coupled(graph: Graph, specs: dict[str, TensorSpec]) -> dict[str, tuple[str, ...]]:
    """For each symbolic dim of the model's inputs, the nodes (as notes naming node, op and why) whose result for
    one sample along that dim depends on the others."""
    dims = {d for name in graph.inputs for d in (getattr(specs.get(name), "shape", None) or ()) if isinstance(d, str)}
    found: dict[str, list[str]] = {d: [] for d in dims}
    for node, reads in zip(graph.nodes, graph.reads):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        first = specs.get(node.input[0]) if node.input and node.input[0] else None
        shape = first.shape if first is not None and first.shape else ()
        label = f"node {node.name or node.output[0]!r} ({node.op_type})"
        if (domain, node.op_type) in WHOLE_TENSOR:
            for d in {d for d in shape if isinstance(d, str)} & dims:
                found[d].append(f"{label} {WHOLE_TENSOR[(domain, node.op_type)]}")
            continue
        inner = _whole_tensor_ops_in_bodies(node)
        if inner:
            outer = {d for r in reads for d in (getattr(specs.get(r), "shape", None) or ()) if isinstance(d, str)}
            for d in outer & dims:
                found[d] += [f"{label} runs {n.op_type} in a subgraph, which {why}" for n, why in inner]
        if domain:
            continue
        for axis, why in _coupling_axes(graph, node, len(shape)):
            d = shape[axis] if 0 <= axis < len(shape) else None
            if isinstance(d, str) and d in found:
                found[d].append(f"{label} {why} along axis {axis}")
    return {d: tuple(notes) for d, notes in found.items() if notes}


def _whole_tensor_ops_in_bodies(node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, str]]:
    """The whole-tensor ops (see WHOLE_TENSOR) anywhere in ``node``'s subgraphs, nested ones included."""
    found = []
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else \
            list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
        for body in bodies:
            for inner in body.node:
                why = WHOLE_TENSOR.get(("" if inner.domain in ("", "ai.onnx") else inner.domain, inner.op_type))
                if why is not None:
                    found.append((inner, why))
                found += _whole_tensor_ops_in_bodies(inner)
    return found


def _coupling_axes(graph: Graph, node: onnx.NodeProto, rank: int) -> list[tuple[int, str]]:
    """(axis, why) for each axis of the first input along which ``node`` mixes elements (none when unknown)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op in REDUCE:
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = _constant(graph, node.input[1])
            if axes is None:
                return []  # computed axes: cannot tell
        if not axes:
            return [] if attrs.get("noop_with_empty_axes", 0) else [(a, "reduces") for a in range(rank)]
        return [(_norm(int(a), rank), "reduces") for a in axes]
    if op in ONE_AXIS:
        name, default, why = ONE_AXIS[op]
        return [(_norm(int(attrs.get(name, default)), rank), why)]
    if op == "CumSum" and len(node.input) > 1:
        axis = _constant(graph, node.input[1])
        return [] if axis is None else [(_norm(int(axis[0]), rank), "sums cumulatively")]
    if op == "MeanVarianceNormalization":
        return [(_norm(int(a), rank), "normalises") for a in attrs.get("axes", (0, 2, 3))]
    if op == "BatchNormalization" and attrs.get("training_mode", 0):
        return [(0, "computes batch statistics (training_mode=1)")]
    return []


def _constant(graph: Graph, name: str) -> list[int] | None:
    """A small integer initializer or Constant's values, or ``None`` (not constant, or stored externally)."""
    tensor = graph.initializers.get(name)
    if tensor is None and name in graph.constants:
        tensor = next((a.t for a in graph.constants[name].attribute if a.type == onnx.AttributeProto.TENSOR), None)
    if tensor is None or is_external(tensor):
        return None
    return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
