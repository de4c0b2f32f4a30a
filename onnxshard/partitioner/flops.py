"""FLOPs per node: multiply-adds count twice; the ops that do most of a model's work have a formula (matrix
products, convolutions, recurrent layers, attention, Einsum, with their quantized and ``com.microsoft`` forms);
everything else is about one operation per output element. Ops of other domains with no formula are named by
:func:`unpriced`, so a plan says where its analytic costs are guesses."""

from __future__ import annotations

import math
import re

import onnx

from onnxshard.plans import TensorSpec

MATMUL = frozenset({"MatMul", "MatMulInteger", "FusedMatMul", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul",
                    "MatMulIntegerToFloat", "MatMulBnb4", "QOrderedMatMul"})
CONV = frozenset({"Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "FusedConv", "NhwcConv"})
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}  # weight blocks of a recurrent layer
ATTENTION = frozenset({"Attention", "QAttention", "MultiHeadAttention", "GroupQueryAttention",
                       "DecoderMaskedMultiHeadAttention", "SparseAttention"})
# contrib ops whose work is a few operations per output element, as the default counts them
ELEMENTWISE_CONTRIB = frozenset({
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "FastGelu",
    "Gelu", "BiasGelu", "QuickGelu", "BiasAdd", "BiasSplitGelu", "BiasDropout", "BiasSoftmax", "RotaryEmbedding",
    "EmbedLayerNormalization", "LayerNormalization", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
    "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSoftmax", "GatherND", "Trilu", "Inverse", "NGramRepeatBlock",
})
DEFAULT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def node_flops(node: onnx.NodeProto, specs: dict[str, TensorSpec], dims: dict[str, int]) -> float:
    """The node's FLOPs per sample (symbolic dims sized by ``dims``, 1 when not given)."""
    from onnxshard.partitioner.cost import concrete

    def shape(k: int):
        return concrete(specs.get(node.input[k]), dims) if len(node.input) > k and node.input[k] else None

    out = concrete(specs.get(node.output[0]), dims) if node.output and node.output[0] else None
    out_elems = math.prod(out) if out is not None else 1
    op = node.op_type
    if op in MATMUL:
        a = shape(0)
        return 2.0 * out_elems * (a[-1] if a else 1)
    if op in ("Gemm", "QGemm"):
        a = shape(0)
        trans_a = any(x.name == "transA" and x.i for x in node.attribute)
        return 2.0 * out_elems * ((a[0] if trans_a else a[-1]) if a else 1)
    if op in CONV:
        w = shape(3 if op == "QLinearConv" else 1)
        if w and len(w) >= 2:
            per_out = math.prod(w[1:]) if op != "ConvTranspose" else math.prod(w[2:]) * w[0] // max(1, w[1])
            return 2.0 * out_elems * per_out
    if op in GATES:
        x, w, r = shape(0), shape(1), shape(2)
        if x and w and r:  # every step of the sequence, every row: the input and hidden products of all gates
            steps_rows = math.prod(x[:-1])
            return 2.0 * steps_rows * (math.prod(w) + math.prod(r))
    if op in ATTENTION:
        flops = _attention(node, shape)
        if flops is not None:
            return flops
    if op == "Einsum":
        flops = _einsum(node, shape)
        if flops is not None:
            return flops
    subgraph_flops = 0.0
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            subgraph_flops = max(subgraph_flops, sum(node_flops(n, specs, dims) for n in attr.g.node))
    return float(max(out_elems, 1)) + subgraph_flops


def _attention(node, shape) -> float | None:
    """``com.microsoft`` attention: the fused QKV projection (Attention, QAttention: input x weight) and the two
    products of the scores (query x keys, scores x values)."""
    q = shape(0)
    if not q or len(q) != 3:
        return None
    rows, width = q[0] * q[1], q[2]
    flops = 0.0
    if node.op_type in ("Attention", "QAttention"):
        w = shape(1)
        if not w or len(w) != 2:
            return None
        flops += 2.0 * rows * w[0] * w[1]
        width = w[1] // 3
        keys = q[1]
    else:
        k = shape(1)
        keys = k[1] if k and len(k) == 3 else q[1]
    return flops + 4.0 * rows * keys * width


def _einsum(node, shape) -> float | None:
    """Twice the product of the sizes of every index of the equation (one multiply-add per combination)."""
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
    terms = equation.split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for k, term in enumerate(terms):
        dims = shape(k)
        letters = re.findall(r"[A-Za-z]", term)
        if dims is None or "..." in term or len(letters) != len(dims):
            return None
        for letter, d in zip(letters, dims):
            sizes[letter] = max(sizes.get(letter, 1), d)
    return 2.0 * math.prod(sizes.values()) if sizes else None


def unpriced(nodes) -> dict[str, int]:
    """Ops outside ONNX's own domains that have no formula here (counted as one operation per output element),
    with how many nodes of each."""
    found: dict[str, int] = {}
    for node in nodes:
        if node.domain in DEFAULT_DOMAINS:
            continue
        if node.op_type in MATMUL | CONV | ATTENTION | ELEMENTWISE_CONTRIB or node.op_type in GATES or \
                node.op_type in ("Gemm", "QGemm", "Einsum"):
            continue
        key = f"{node.domain}.{node.op_type}"
        found[key] = found.get(key, 0) + 1
    return found
