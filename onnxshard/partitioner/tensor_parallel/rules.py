"""How each op carries a sharded input: a registry from op type to rule (``RULES``), and the helpers the rules
share (as methods of the pass, through the :class:`Rules` mixin). A rule returns the node's rewrite, or
``None`` when the op cannot keep the value sharded (then it reads it whole)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import helper

from onnxshard.partitioner.tensor_parallel.layout import (
    REPLICATED,
    Rewrite,
    State,
)
from onnxshard.partitioner.tensor_parallel.shapes import ShapeRules
from onnxshard.plans import Reduce, shares, starts

UNARY = frozenset({
    "Relu", "Gelu", "Tanh", "Sigmoid", "Erf", "Exp", "Log", "Neg", "Sqrt", "Abs", "Cast", "Identity", "Softplus",
    "Softsign", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Not", "Sin", "Cos", "IsNaN", "IsInf", "ThresholdedRelu", "QuickGelu", "BiasGelu", "FastGelu",
})
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "PRelu", "Mod", "BitShift", "Clip",
})
CHANNELWISE = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                         "InstanceNormalization"})
REDUCE = frozenset({"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
                    "ReduceLogSumExp", "ReduceSumSquare"})



class Rules(ShapeRules):
    """Mixin of the propagation pass: the per-op rewrites and the helpers they share."""

    def _keep(self, node, outs: list[State], replace: dict[int, str] | None = None) -> Rewrite:
        local = self._local_reads(node)
        self._set(node, outs)
        return Rewrite([self._renamed(node, replace or {})], "local", local_reads=local)

    def _aligned(self, node, s_out: State, start: int = 0) -> Rewrite | None:
        """Keep ``node`` sharded as ``s_out``, reading each operand from ``start`` on as it must be read next to
        that (see ``_local_operand``)."""
        replace = {}
        for k in range(start, len(node.input)):
            name = node.input[k]
            if not name:
                continue
            got = self._local_operand(node, k, node.output[0], s_out)
            if got is None:
                return None
            if got not in (name, self.layout.local(name)):
                replace[k] = got
        return self._keep(node, [s_out] * len(node.output), replace)

    def _out_axis(self, name: str, s: State, out: str) -> int | None:
        rin, rout = len(self.shape(name) or ()), len(self.shape(out) or ())
        return None if not rin or not rout else rout - rin + s.axis

    def _local_operand(self, node, k: int, out: str, s_out: State) -> str | None:
        """Input ``k`` as it must be read next to a sharded result ``s_out`` (on ``out``): itself if it broadcasts
        along the sharded axis, its rank's slice otherwise (a weight slice, or a Slice node made by the caller)."""
        name = node.input[k]
        st = self.state(name)
        rout = len(self.shape(out) or ())
        shape = self.shape(name)
        if shape is None:
            return None
        pos = s_out.axis - (rout - len(shape))
        if st.kind == "S":
            return self.layout.local(name) if pos == st.axis and st.split == s_out.split else None
        if pos < 0 or shape[pos] == 1 or self._static_dim(name, pos) == 1:
            return name
        if self.is_weight(name):
            return self.weight(name, pos, s_out.blocks or (shape[pos],), s_out.unit)
        if len(s_out.blocks) > 1 or not isinstance(shape[pos], int):
            return None
        return self._slice_node(node, k, pos, shape[pos], s_out.unit)

    def _static_dim(self, name: str, axis: int, depth: int = 0) -> int | None:
        """Dim ``axis`` of ``name`` where shape inference lost it: a Slice with computed bounds (the causal mask
        of a GPT-2 export, ``bias[:, :, a:b, :b]``) keeps the dims of the axes it does not slice."""
        shape = self.shape(name)
        if shape is not None and axis < len(shape) and isinstance(shape[axis], int):
            return shape[axis]
        at = self.g.producer.get(name)
        if at is None or depth > 8:
            return None
        node = self.g.nodes[at]
        if node.op_type in ("Cast", "Identity") or (node.op_type == "Slice" and len(node.input) > 3 and
                                                     node.input[3]):
            rank = len(self.shape(node.input[0]) or ())
            axes = self.const(node.input[3]) if node.op_type == "Slice" else []
            if shape is not None and rank == len(shape) and axes is not None and \
                    axis not in {int(a) % rank for a in axes}:
                return self._static_dim(node.input[0], axis, depth + 1)
        return None

    def _slice_node(self, node, k: int, axis: int, size: int, unit: int = 1) -> str:
        """A Slice of input ``k`` to this rank's part of ``axis`` (``size`` long, cut in ``unit``s)."""
        name = node.input[k]
        out = f"{node.name}@in{k}"
        first, count = starts(size, self.t, unit), shares(size, self.t, unit)
        begin = self.rank_const(f"{out}.starts", [np.array([a], np.int64) for a in first])
        end = self.rank_const(f"{out}.ends", [np.array([a + n], np.int64) for a, n in zip(first, count)])
        axes = self.new_const(f"{out}.axes", np.array([axis], np.int64))
        self._pre.append(helper.make_node("Slice", [name, begin, end, axes], [out], name=f"{out}.slice"))
        return out

    def _elementwise(self, node, ins):
        out = node.output[0]
        axes = {(self._out_axis(x, st, out), st.split) for x, st in zip(node.input, ins) if st.kind == "S"}
        if len(axes) != 1 or None in {a for a, _ in axes}:
            return None
        axis, (blocks, unit) = axes.pop()
        return self._aligned(node, State("S", axis, blocks, unit))

    def _matmul(self, node, ins):
        a, b = node.input[0], node.input[1]
        sa, sb = ins[0], ins[1]
        ra, rb = len(self.shape(a) or ()), len(self.shape(b) or ())
        rout = len(self.shape(node.output[0]) or ())
        if ra < 2 or rb < 2 or not rout:
            return None
        # Role of each sharded axis: contracted (K), rows (M), columns (N) or a batch axis of the output.
        if sa.kind == "S" and sa.axis == ra - 1:  # K
            if sb.kind == "S":
                if sb.axis != rb - 2 or sb.split != sa.split:
                    return None
                return self._partial(node, {})
            if self.is_weight(b) and rb == 2:
                return self._row(node, {1: (b, 0)}, s=sa)
            shape_b = self.shape(b)
            if len(sa.blocks) > 1 or not isinstance(shape_b[-2], int):
                return None
            return self._partial(node, {1: self._slice_node(node, 1, rb - 2, shape_b[-2], sa.unit)})
        if sb.kind == "S" and sb.axis == rb - 2:
            return None  # B sharded on K but A whole: slicing A to match is possible but not worth a rule
        out_axes = set()  # rows of A, columns of B, or a batch axis of either
        if sa.kind == "S":
            out_axes.add((rout - 2 if sa.axis == ra - 2 else rout - ra + sa.axis, sa.split))
        if sb.kind == "S":
            out_axes.add((rout - 1 if sb.axis == rb - 1 else rout - rb + sb.axis, sb.split))
        if len(out_axes) != 1:
            return None
        axis, (blocks, unit) = out_axes.pop()
        s_out = State("S", axis, blocks, unit)
        replace = {}
        for k, (name, st, r) in enumerate(((a, sa, ra), (b, sb, rb))):
            if st.kind == "S":
                continue
            if axis >= rout - 2:  # M or N: the other operand is used whole
                continue
            shape = self.shape(name)
            pos = axis - (rout - r)
            if pos < 0 or shape[pos] == 1:
                continue
            if len(blocks) > 1 or not isinstance(shape[pos], int):
                return None
            replace[k] = self._slice_node(node, k, pos, shape[pos], unit)
        return self._keep(node, [s_out], replace)

    def _partial(self, node, replace):
        local = self._local_reads(node)
        self._set(node, [State("P")])
        return Rewrite([self._renamed(node, replace)], "local", local_reads=local)

    def _row(self, node, weights: dict[int, tuple[str, int]], *, s: State, bias: int | None = None):
        """Take the rows (input channels) of each weight matching the sharded input (state ``s``); the output is
        partial and the bias, if any, is added once after the sum."""
        replace = {}
        for k, (name, axis) in weights.items():
            shape = self.shape(name)
            replace[k] = self.weight(name, axis, s.blocks or (shape[axis],), s.unit)
        has_bias = bias is not None and len(node.input) > bias and node.input[bias]
        if has_bias and node.op_type == "Gemm" and self.attr(node, "beta", 1.0) != 1.0:
            return None
        local = self._local_reads(node)
        out = node.output[0]
        self.states[out] = State("P")
        copy = self._renamed(node, replace, drop_from=bias if has_bias else None)
        if not has_bias:
            return Rewrite([copy], "row", local_reads=local)
        # The partial is summed into out@sum; the bias is added after, on the whole value.
        summed = f"{out}@sum"
        self.layout.reduces[summed] = Reduce(summed, self.layout.local(out), "sum")
        b = node.input[bias]
        nodes = [copy]
        if node.op_type == "Conv":
            rank = len(self.shape(out) or ())
            shape = self.new_const(f"{b}.shape", np.array([-1] + [1] * (rank - 2), np.int64))
            nodes.append(helper.make_node("Reshape", [b, shape], [f"{out}@bias"], name=f"{node.name}@bias"))
            b = f"{out}@bias"
        nodes.append(helper.make_node("Add", [summed, b], [out], name=f"{node.name}@add_bias"))
        self.states[out] = REPLICATED  # out is made whole, after the sum; only out@partial is rank-local
        return Rewrite(nodes, "row", local_reads=local)

    def _gemm(self, node, ins):
        if self.attr(node, "transA", 0) or ins[0].kind != "S" or any(x.kind == "S" for x in ins[1:]):
            return None
        if ins[0].axis == 1 and self.is_weight(node.input[1]):
            return self._row(node, {1: (node.input[1], 1 if self.attr(node, "transB", 0) else 0)}, bias=2,
                             s=ins[0])
        return None

    def _reduce(self, node, s: State) -> Rewrite | None:
        src = self.shape(node.input[0])
        if not src:
            return None
        axes = self._axes(node)
        if axes is None:
            return None  # all axes
        axes = {int(a) % len(src) for a in axes}
        if s.axis in axes:
            return None
        keep = self.attr(node, "keepdims", 1)
        axis = s.axis if keep else s.axis - sum(a < s.axis for a in axes)
        return self._keep(node, [s.at(axis)])


# -- the registry: op type -> rule(pass, node, input states, the first sharded input's state) ----------------------
Rule = Callable[..., "Rewrite | None"]
RULES: dict[str, Rule] = {}


def rule(*ops: str, first: bool = False):
    """Register a rule for ``ops``; ``first``: it applies only when the node's first input is the sharded one."""
    def register(fn: Rule) -> Rule:
        wrapped = (lambda p, node, ins, s: fn(p, node, ins, s) if ins[0].kind == "S" else None) if first else fn
        RULES.update(dict.fromkeys(ops, wrapped))
        return fn
    return register


def _all_replicated(ins) -> bool:
    return all(x.kind == "R" for x in ins[1:])


def _rank(p, name: str) -> int:
    return len(p.shape(name) or ())


@rule(*UNARY)
def _unary(p, node, ins, s):
    if sum(x.kind == "S" for x in ins) == 1 and ins[0].kind == "S":
        return p._aligned(node, s, start=1)
    return None


@rule(*ELEMENTWISE)
def _elementwise(p, node, ins, s):
    return p._elementwise(node, ins)


@rule("MatMul")
def _matmul(p, node, ins, s):
    return p._matmul(node, ins)


@rule("Gemm")
def _gemm(p, node, ins, s):
    return p._gemm(node, ins)


@rule("Concat")
def _concat(p, node, ins, s):
    return p._concat(node, ins)


@rule("Conv", first=True)
def _conv(p, node, ins, s):
    """Input channels sharded: the weight's matching input channels, a partial sum (row split)."""
    if ins[0].axis == 1 and p.attr(node, "group", 1) == 1 and p.is_weight(node.input[1]) and _all_replicated(ins):
        return p._row(node, {1: (node.input[1], 1)}, bias=2, s=s)
    return None


@rule("Transpose", first=True)
def _transpose(p, node, ins, s):
    perm = list(p.attr(node, "perm") or reversed(range(_rank(p, node.input[0]))))
    return p._keep(node, [s.at(perm.index(s.axis))])


@rule("Reshape", "Expand", first=True)
def _reshape(p, node, ins, s):
    return p._reshape(node, s)


@rule("Split", first=True)
def _split(p, node, ins, s):
    return p._split(node, s)


@rule("Softmax", "LogSoftmax", "Hardmax", first=True)
def _softmax(p, node, ins, s):
    axis = p.attr(node, "axis", -1 if p.opset >= 13 else 1) % max(_rank(p, node.input[0]), 1)
    ok = s.axis != axis if p.opset >= 13 else s.axis < axis  # before opset 13 it flattens from axis on
    return p._keep(node, [s]) if ok else None


@rule("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", first=True)
def _layer_norm(p, node, ins, s):
    axis = p.attr(node, "axis", -1) % max(_rank(p, node.input[0]), 1)
    if s.axis < axis and _all_replicated(ins):
        return p._keep(node, [s] + [REPLICATED] * (len(node.output) - 1))
    return None


@rule("BatchNormalization", first=True)
def _batch_norm(p, node, ins, s):
    if s.axis != 1 or len(node.output) != 1:
        return None
    sliced = {k: p.weight(node.input[k], 0, (p.shape(node.input[k])[0],), s.unit) for k in range(1, 5)
              if p.is_weight(node.input[k])}
    return p._keep(node, [s], sliced) if len(sliced) == 4 else None


@rule(*CHANNELWISE, first=True)
def _channelwise(p, node, ins, s):
    return p._keep(node, [s] * len(node.output)) if s.axis == 1 and len(node.input) == 1 else None


@rule("Unsqueeze", "Squeeze", first=True)
def _unsqueeze_squeeze(p, node, ins, s):
    return p._unsqueeze_squeeze(node, s)


@rule(*REDUCE, first=True)
def _reduce(p, node, ins, s):
    return p._reduce(node, s)


@rule("Dropout", first=True)
def _dropout(p, node, ins, s):
    return p._keep(node, [s] * len(node.output)) if _all_replicated(ins) else None


@rule("Slice", first=True)
def _slice(p, node, ins, s):
    """Slicing along other axes keeps the shards."""
    if not _all_replicated(ins):
        return None
    rank = _rank(p, node.input[0])
    starts = p.const(node.input[1])
    has_axes = len(node.input) > 3 and node.input[3]
    axes = p.const(node.input[3]) if has_axes else None if starts is None else np.arange(starts.size)
    if axes is None or not rank or s.axis in {int(a) % rank for a in axes}:
        return None
    return p._keep(node, [s])


@rule("Gather", first=True)
def _gather(p, node, ins, s):
    """Gathering along another axis with replicated indices keeps the shards (the axis moves by their rank)."""
    if ins[1].kind != "R":
        return None
    axis = p.attr(node, "axis", 0) % len(p.shape(node.input[0]) or (1,))
    indices = p.shape(node.input[1])
    if axis == s.axis or indices is None:
        return None
    new_axis = s.axis if s.axis < axis else s.axis + len(indices) - 1
    return p._keep(node, [s.at(new_axis)])
