"""Tensor (Megatron-style) sharding: the same layers on T ranks, each holding a slice of the weights.

Every tensor gets a *state*: ``R`` (replicated: every rank holds all of it), ``S(axis)`` (sharded: rank ``r``
holds the ``r``-th of T equal chunks along ``axis``; for a fused projection the axis is a row of ``blocks``, each
cut in T) or ``P`` (partial: the value is the sum of the ranks' addends). One pass over the nodes in
topological order decides the states:

- a MatMul/Gemm or Conv with a replicated input and a weight initializer is split by output columns/channels
  (``S``); one whose input is sharded along the contracted axis takes the matching weight rows (``P``); a large
  embedding Gather takes a range of vocabulary rows and masks the ids outside it (``P``);
- ops that work along other axes (elementwise, reshapes of head counts, transposes, attention MatMuls, softmax
  over another axis, fused-QKV Split, GQA Expand) keep a sharded tensor sharded, with their shape constants
  rewritten to the per-rank sizes; a replicated operand meeting a sharded one is sliced locally;
- a consumer that needs the whole tensor reads it *full*: the ranks sum a ``P`` (all-reduce) or concatenate an
  ``S`` (all-gather) first. Row-split biases are added after the sum, once.

A split whose sizes T does not divide is rolled back (its layers stay replicated), and the reason is kept in
``notes`` for ``onnxshard inspect``. The original name of a tensor always means its full value; a rank's local
value is ``name@shard`` (S) or ``name@partial`` (P).

The stage writer then cuts each stage's rewritten nodes into *steps* at the reduces: step ``j`` runs on every
rank, then the ranks exchange what step ``j + 1`` needs whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshard.partitioner.cost import SMALL_INT_BYTES
from onnxshard.partitioner.graph import Graph, node_reads
from onnxshard.partitioner.model import is_external, load_inline, node_tensors, tensor_nbytes
from onnxshard.plans import Reduce, TensorSpec

TP_CONFIG = "onnxshard.tp"  # configuration_id of the sharding_spec annotations onnxshard writes
VOCAB_MIN_BYTES = 1 << 20  # embeddings at least this big are split by vocabulary rows

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


@dataclass(frozen=True)
class State:
    kind: str  # "R", "S" or "P"
    axis: int = 0
    blocks: tuple[int, ...] = ()  # S: global sizes of the blocks along ``axis`` (one block if empty)


REPLICATED = State("R")


@dataclass(frozen=True)
class WeightSlice:
    """Rank ``r`` holds chunk ``r`` of each block of ``source`` along ``axis``."""

    source: str
    axis: int
    blocks: tuple[int, ...]

    @property
    def name(self) -> str:
        suffix = "" if len(self.blocks) == 1 else ".b" + "_".join(map(str, self.blocks))
        return f"{self.source}@tp{self.axis}{suffix}"

    def contiguous(self, dims) -> bool:
        """Whether each rank's slice is one byte range of the source (leading axis, one block)."""
        return len(self.blocks) == 1 and all(d == 1 for d in dims[:self.axis])


@dataclass(frozen=True)
class RankConst:
    """A small constant whose value depends on the rank: ``values[r]``."""

    name: str
    values: tuple[np.ndarray, ...]


@dataclass
class Rewrite:
    """What one original node becomes on every rank."""

    nodes: list[onnx.NodeProto]
    kind: str = "replicate"  # replicate | col | row | vocab | local
    local_reads: list[str] = field(default_factory=list)  # sharded tensors it reads as each rank's slice


@dataclass
class Layout:
    """The tensor-parallel layout of a whole graph for degree ``degree``."""

    degree: int
    states: dict[str, State]
    rewrites: list[Rewrite]  # aligned with graph.nodes
    weights: dict[str, WeightSlice]  # by slice name
    consts: dict[str, onnx.TensorProto]  # new rank-independent constants (per-rank shapes)
    rank_consts: dict[str, RankConst]
    reduces: dict[str, Reduce]  # by the whole name they make
    notes: list[str]

    @property
    def splits(self) -> int:
        return sum(r.kind in ("col", "row", "vocab") for r in self.rewrites)

    def local(self, name: str) -> str:
        s = self.states.get(name, REPLICATED)
        return name if s.kind == "R" else f"{name}@{'shard' if s.kind == 'S' else 'partial'}"

    def value_spec(self, name: str, specs: dict[str, TensorSpec]) -> TensorSpec | None:
        """The type and shape of ``name`` on one rank, for model values and their rank-local versions
        (``x@shard`` has 1/T of the sharded axis); ``None`` for helper values of unknown type."""
        base, _, suffix = name.rpartition("@")
        if not base or suffix not in ("shard", "partial", "sum"):
            return specs.get(name)
        spec = specs.get(base)
        if spec is None:
            return None
        shape = spec.shape
        axis = self.states.get(base, REPLICATED).axis
        if suffix == "shard" and shape is not None and isinstance(shape[axis], int):
            shape = shape[:axis] + (shape[axis] // self.degree,) + shape[axis + 1:]
        return TensorSpec(name, spec.dtype, shape)

    def reduce_for(self, name: str) -> Reduce | None:
        """The reduce that makes ``name`` whole, when it is sharded or partial."""
        if name in self.reduces:
            return self.reduces[name]
        s = self.states.get(name, REPLICATED)
        if s.kind == "R":
            return None
        op = "sum" if s.kind == "P" else "concat"
        return self.reduces.setdefault(name, Reduce(name, self.local(name), op, s.axis, s.blocks))

    def node_param_bytes(self, graph: Graph) -> list[int]:
        """Per node, the weight bytes one rank holds for it (a weight counted at its first reader)."""
        seen: set[str] = set()
        out = []
        for rw in self.rewrites:
            total = 0
            for node in rw.nodes:
                for name in node.input:
                    if name in seen:
                        continue
                    if name in self.weights or name in graph.initializers or name in graph.constants:
                        seen.add(name)
                        total += rank_bytes(graph, self, name)
            out.append(total)
        return out


class _Rollback(Exception):
    def __init__(self, message: str, starts: Iterable[int]):
        super().__init__(message)
        self.starts = frozenset(starts)


def shard_graph(graph: Graph, specs: dict[str, TensorSpec], degree: int) -> Layout:
    """Decide every tensor's state for ``degree`` ranks and rewrite each node for one rank."""
    excluded: set[int] = set()
    notes: list[str] = []
    while True:
        try:
            return _Pass(graph, specs, degree, excluded, notes).run()
        except _Rollback as e:
            if not e.starts or e.starts <= excluded:
                raise AssertionError(f"tensor-parallel rollback made no progress: {e}") from None
            excluded |= e.starts
            notes.append(str(e))


def rank_bytes(graph: Graph, layout: Layout, name: str) -> int:
    """Bytes one rank holds for the weight (or weight slice) ``name``."""
    if name in layout.weights:
        return _tensor_bytes(graph, layout.weights[name].source) // layout.degree
    return _tensor_bytes(graph, name)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tensor_bytes(graph: Graph, name: str) -> int:
    if name in graph.initializers:
        return tensor_nbytes(graph.initializers[name])
    node = graph.constants.get(name)
    return sum(tensor_nbytes(t) for t in node_tensors(node)) if node else 0


class _Pass:
    """One pass over the graph with a fixed set of excluded split points."""

    def __init__(self, graph: Graph, specs, degree: int, excluded: set[int], notes: list[str]):
        self.g, self.specs, self.t, self.excluded = graph, specs, degree, excluded
        self.opset = next((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.states: dict[str, State] = {}
        self.prov: dict[str, frozenset[int]] = {}
        self.layout = Layout(degree, self.states, [], {}, {}, {}, {}, list(notes))
        self._pre: list[onnx.NodeProto] = []
        self.consumers: dict[str, list[int]] = {}
        for i, reads in enumerate(graph.reads):
            for r in reads:
                self.consumers.setdefault(r, []).append(i)

    def run(self) -> Layout:
        for i, node in enumerate(self.g.nodes):
            self.i = i
            self.layout.rewrites.append(self._node(i, node))
        return self.layout

    # -- helpers ------------------------------------------------------------------------------------------
    def shape(self, name: str):
        spec = self.specs.get(name)
        return None if spec is None else spec.shape

    def state(self, name: str) -> State:
        return self.states.get(name, REPLICATED)

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant node), or None when it is computed."""
        if name in self.g.constants:
            attr = next((a for a in self.g.constants[name].attribute if a.type == onnx.AttributeProto.TENSOR), None)
            return None if attr is None else numpy_helper.to_array(attr.t)
        t = self.g.initializers.get(name)
        if t is None:
            return None
        if is_external(t):
            if tensor_nbytes(t) > SMALL_INT_BYTES:
                return None
            inline = onnx.TensorProto()
            inline.CopyFrom(t)  # the graph's own stays external
            load_inline(inline, self.g.folder)
            t = inline
        return numpy_helper.to_array(t)

    def is_weight(self, name: str) -> bool:
        return name in self.g.initializers or name in self.g.constants

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def new_const(self, base: str, value: np.ndarray) -> str:
        name = f"{base}@tp"
        while name in self.layout.consts and not np.array_equal(numpy_helper.to_array(self.layout.consts[name]),
                                                                value):
            name += "_"
        self.layout.consts[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def weight(self, name: str, axis: int, blocks: tuple[int, ...]) -> str:
        ws = WeightSlice(name, axis, tuple(blocks))
        self.layout.weights.setdefault(ws.name, ws)
        return ws.name

    def divides(self, size, what: str, node) -> None:
        """Roll back the splits that lead here (or this split itself) unless T divides ``size``."""
        if isinstance(size, int) and size > 0 and size % self.t == 0:
            return
        valid = ", ".join(map(str, divisors(size))) if isinstance(size, int) and size > 0 else "unknown"
        starts = frozenset().union(*(self.prov.get(x, frozenset()) for x in node.input if x)) or {self.i}
        raise _Rollback(f"node {node.name!r} ({node.op_type}): {what} {size} is not divisible by "
                        f"tensor_parallel={self.t} (valid degrees: {valid}); its layer stays replicated", starts)

    # -- per node ------------------------------------------------------------------------------------------
    def _node(self, i: int, node: onnx.NodeProto) -> Rewrite:
        ins = [self.state(x) if x else REPLICATED for x in node.input]
        sharded = any(s.kind == "S" for s in ins)
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        rule = None  # a node with subgraphs reads everything whole
        if not has_subgraph and not sharded and i not in self.excluded:
            rule = self._start(node)
        elif not has_subgraph and sharded:
            self._pre = []  # helper nodes (local slices, rebuilt shapes) the rule adds before the node
            rule = self._propagate(node, ins)
            if rule is not None and self._pre:
                rule.nodes[:0] = self._pre
        if rule is None:
            rule = Rewrite([_copy(node)])
        # Every sharded or partial value this node does not read locally, it reads whole (outer scopes too).
        for name in self.g.reads[i]:
            if self.state(name).kind != "R" and name not in rule.local_reads:
                self.layout.reduce_for(name)
        prov = frozenset().union(*(self.prov.get(x, frozenset()) for x in rule.local_reads))
        if rule.kind in ("col", "vocab"):
            prov |= {i}
        for out in node.output:
            if out and self.state(out).kind != "R":
                self.prov[out] = prov
        if rule.kind != "replicate":
            _annotate(rule.nodes, self.t, self.layout.weights)
        return rule

    def _set(self, node, states: list[State]) -> None:
        for out, s in zip(node.output, states):
            if out:
                self.states[out] = s

    def _renamed(self, node, replace: dict[int, str], *, drop_from: int | None = None) -> onnx.NodeProto:
        """A copy of ``node`` reading local names for its sharded inputs (``replace`` overrides by index) and
        writing local names for its sharded/partial outputs."""
        copy = _copy(node)
        for k, name in enumerate(node.input):
            if k in replace:
                copy.input[k] = replace[k]
            elif name and self.state(name).kind == "S":
                copy.input[k] = self.layout.local(name)
        if drop_from is not None:
            del copy.input[drop_from:]
        for k, name in enumerate(node.output):
            if name:
                copy.output[k] = self.layout.local(name)
        return copy

    def _local_reads(self, node) -> list[str]:
        return [x for x in node.input if x and self.state(x).kind == "S"]

    # -- split points ---------------------------------------------------------------------------------------
    def _start(self, node) -> Rewrite | None:
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        if op == "MatMul" and self.is_weight(node.input[1]):
            w = self.shape(node.input[1])
            out = self.shape(node.output[0])
            if not w or len(w) != 2 or not out or len(out) < 2:
                return None
            blocks = self._blocks(node.output[0], w[1])
            for b in blocks:
                self.divides(b, "output width", node)
            self._set(node, [State("S", len(out) - 1, _multi(blocks))])
            return Rewrite([self._renamed(node, {1: self.weight(node.input[1], 1, blocks)})], "col")
        if op == "Gemm" and self.is_weight(node.input[1]) and not self.attr(node, "transA", 0):
            w = self.shape(node.input[1])
            if not w or len(w) != 2:
                return None
            trans_b = self.attr(node, "transB", 0)
            n = w[0] if trans_b else w[1]
            blocks = self._blocks(node.output[0], n)
            for b in blocks:
                self.divides(b, "output width", node)
            replace = {1: self.weight(node.input[1], 0 if trans_b else 1, blocks)}
            if len(node.input) > 2 and node.input[2]:
                c = self.shape(node.input[2])
                if c is None:
                    return None
                if c and c[-1] == n and self.is_weight(node.input[2]):
                    replace[2] = self.weight(node.input[2], len(c) - 1, blocks)
                elif c and c[-1] != 1:
                    return None
            self._set(node, [State("S", 1, _multi(blocks))])
            return Rewrite([self._renamed(node, replace)], "col")
        if op == "Conv" and self.is_weight(node.input[1]) and self.attr(node, "group", 1) == 1:
            w = self.shape(node.input[1])
            if not w:
                return None
            self.divides(w[0], "output channels", node)
            replace = {1: self.weight(node.input[1], 0, (w[0],))}
            if len(node.input) > 2 and node.input[2]:
                replace[2] = self.weight(node.input[2], 0, (w[0],))
            self._set(node, [State("S", 1)])
            return Rewrite([self._renamed(node, replace)], "col")
        if op == "Gather" and self.is_weight(node.input[0]) and self.attr(node, "axis", 0) == 0:
            w = self.shape(node.input[0])
            if not w or len(w) != 2 or _tensor_bytes(self.g, node.input[0]) < VOCAB_MIN_BYTES:
                return None
            self.divides(w[0], "vocabulary size", node)
            return self._vocab(node, w[0])
        return None

    def _blocks(self, out: str, width: int) -> tuple[int, ...]:
        """Fused projections (QKV): if ``out`` (through a bias Add) is Split along its last axis, those sizes."""
        name = out
        for _ in range(2):
            users = [self.g.nodes[j] for j in self.consumers.get(name, ())]
            if len(users) != 1:
                return (width,)
            user = users[0]
            if user.op_type == "Add":
                name = user.output[0]
                continue
            if user.op_type == "Split" and user.input[0] == name:
                rank = len(self.shape(name) or ())
                if rank and self.attr(user, "axis", 0) % rank == rank - 1:
                    sizes = self._split_sizes(user)
                    if sizes is not None and sum(sizes) == width:
                        return tuple(int(s) for s in sizes)
            return (width,)
        return (width,)

    def _split_sizes(self, node):
        if self.opset >= 13 and len(node.input) > 1 and node.input[1]:
            v = self.const(node.input[1])
            return None if v is None else [int(x) for x in v]
        split = self.attr(node, "split")
        return None if split is None else [int(x) for x in split]

    def _vocab(self, node, vocab: int) -> Rewrite:
        """Rank r holds rows [r V/T, (r+1) V/T): ids outside it read row 0 and are zeroed, so the ranks' sum is the
        lookup. Negative ids count from the end, as in ONNX Gather; an id out of [-V, V) gets an index out of the
        rank's rows, so ONNX Runtime raises as it does on the whole model."""
        per = vocab // self.t
        ids, out = node.input[1], node.output[0]
        p = f"{out}@vocab"
        np_ids = np.dtype(self.specs[ids].dtype if ids in self.specs else "int64")
        offset = RankConst(f"{p}.offset", tuple(np.array(r * per, np_ids) for r in range(self.t)))
        self.layout.rank_consts[offset.name] = offset
        zero, size, whole, beyond = (self.new_const(f"{p}.{n}", np.array(v, np_ids))
                                     for n, v in (("zero", 0), ("size", per), ("vocab", vocab), ("beyond", per)))
        out_dtype = self.specs[out].dtype if out in self.specs else "float32"
        table = self.weight(node.input[0], 0, (vocab,))
        make = helper.make_node
        nodes = [
            make("Less", [ids, zero], [f"{p}.neg"], name=f"{p}.neg"),
            make("Add", [ids, whole], [f"{p}.wrapped"], name=f"{p}.wrap"),
            make("Where", [f"{p}.neg", f"{p}.wrapped", ids], [f"{p}.ids"], name=f"{p}.ids"),
            make("Sub", [f"{p}.ids", offset.name], [f"{p}.local"], name=f"{p}.sub"),
            make("GreaterOrEqual", [f"{p}.local", zero], [f"{p}.ge"], name=f"{p}.ge"),
            make("Less", [f"{p}.local", size], [f"{p}.lt"], name=f"{p}.lt"),
            make("And", [f"{p}.ge", f"{p}.lt"], [f"{p}.in"], name=f"{p}.and"),
            make("GreaterOrEqual", [f"{p}.ids", zero], [f"{p}.vge"], name=f"{p}.vge"),
            make("Less", [f"{p}.ids", whole], [f"{p}.vlt"], name=f"{p}.vlt"),
            make("And", [f"{p}.vge", f"{p}.vlt"], [f"{p}.valid"], name=f"{p}.valid"),
            make("Where", [f"{p}.valid", zero, beyond], [f"{p}.elsewhere"], name=f"{p}.elsewhere"),
            make("Where", [f"{p}.in", f"{p}.local", f"{p}.elsewhere"], [f"{p}.safe"], name=f"{p}.where"),
            make("Gather", [table, f"{p}.safe"], [f"{p}.rows"], name=node.name, axis=0),
            _unsqueeze(f"{p}.in", f"{p}.in1", -1, self.opset, self),
            make("Cast", [f"{p}.in1"], [f"{p}.mask"], name=f"{p}.cast",
                 to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype))),
            make("Mul", [f"{p}.rows", f"{p}.mask"], [f"{out}@partial"], name=f"{p}.mul"),
        ]
        self._set(node, [State("P")])
        return Rewrite(nodes, "vocab")

    # -- propagation of sharded inputs --------------------------------------------------------------------
    def _propagate(self, node, ins: list[State]) -> Rewrite | None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") and not (node.domain == "com.microsoft" and op in UNARY):
            return None
        s = next(x for x in ins if x.kind == "S")
        if op in UNARY and sum(x.kind == "S" for x in ins) == 1 and ins[0].kind == "S":
            return self._aligned(node, s, start=1)
        if op in ELEMENTWISE:
            return self._elementwise(node, ins)
        if op == "MatMul":
            return self._matmul(node, ins)
        if op == "Gemm":
            return self._gemm(node, ins)
        if op == "Conv" and ins[0].kind == "S" and ins[0].axis == 1 and self.attr(node, "group", 1) == 1 \
                and self.is_weight(node.input[1]) and all(x.kind == "R" for x in ins[1:]):
            return self._row(node, {1: (node.input[1], 1)}, bias=2)
        if op == "Transpose" and ins[0].kind == "S":
            perm = list(self.attr(node, "perm") or reversed(range(len(self.shape(node.input[0]) or ()))))
            return self._keep(node, [State("S", perm.index(s.axis), s.blocks)])
        if op in ("Reshape", "Expand") and ins[0].kind == "S":
            return self._reshape(node, s)
        if op == "Split" and ins[0].kind == "S":
            return self._split(node, s)
        if op in ("Softmax", "LogSoftmax", "Hardmax") and ins[0].kind == "S":
            rank = len(self.shape(node.input[0]) or ())
            axis = self.attr(node, "axis", -1 if self.opset >= 13 else 1) % max(rank, 1)
            ok = s.axis != axis if self.opset >= 13 else s.axis < axis
            return self._keep(node, [s]) if ok else None
        if op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization") and ins[0].kind == "S":
            rank = len(self.shape(node.input[0]) or ())
            axis = self.attr(node, "axis", -1) % max(rank, 1)
            if s.axis < axis and all(x.kind == "R" for x in ins[1:]):
                return self._keep(node, [s] + [REPLICATED] * (len(node.output) - 1))
            return None
        if op == "BatchNormalization" and ins[0].kind == "S" and s.axis == 1 and len(node.output) == 1:
            replace = {k: self.weight(node.input[k], 0, (self.shape(node.input[k])[0],)) for k in range(1, 5)
                       if self.is_weight(node.input[k])}
            return self._keep(node, [s], replace) if len(replace) == 4 else None
        if op in CHANNELWISE and ins[0].kind == "S" and s.axis == 1 and len(node.input) == 1:
            return self._keep(node, [s] * len(node.output))
        if op in ("Unsqueeze", "Squeeze") and ins[0].kind == "S":
            return self._unsqueeze_squeeze(node, s)
        if op in REDUCE and ins[0].kind == "S":
            return self._reduce(node, s)
        if op == "Dropout" and ins[0].kind == "S" and all(x.kind == "R" for x in ins[1:]):
            return self._keep(node, [s] + [s] * (len(node.output) - 1))
        if op == "Slice" and ins[0].kind == "S" and all(x.kind == "R" for x in ins[1:]):
            rank = len(self.shape(node.input[0]) or ())
            starts = self.const(node.input[1])
            has_axes = len(node.input) > 3 and node.input[3]
            axes = self.const(node.input[3]) if has_axes else None if starts is None else np.arange(starts.size)
            if axes is None or not rank or s.axis in {int(a) % rank for a in axes}:
                return None
            return self._keep(node, [s])
        if op == "Gather" and ins[0].kind == "S" and ins[1].kind == "R":
            axis = self.attr(node, "axis", 0) % len(self.shape(node.input[0]) or (1,))
            if axis == s.axis:
                return None
            idx_rank = len(self.shape(node.input[1]) or ()) if self.shape(node.input[1]) is not None else None
            if idx_rank is None:
                return None
            new_axis = s.axis if s.axis < axis else s.axis + idx_rank - 1
            return self._keep(node, [State("S", new_axis, s.blocks)])
        if op == "Concat":
            return self._concat(node, ins)
        return None

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
            return self.layout.local(name) if pos == st.axis and st.blocks == s_out.blocks else None
        if pos < 0 or shape[pos] == 1:
            return name
        if self.is_weight(name):
            return self.weight(name, pos, s_out.blocks or (shape[pos],))
        if len(s_out.blocks) > 1 or not isinstance(shape[pos], int):
            return None
        return self._slice_node(node, k, pos, shape[pos])

    def _slice_node(self, node, k: int, axis: int, size: int) -> str:
        name = node.input[k]
        out = f"{node.name}@in{k}"
        per = size // self.t
        starts = RankConst(f"{out}.starts", tuple(np.array([r * per], np.int64) for r in range(self.t)))
        ends = RankConst(f"{out}.ends", tuple(np.array([(r + 1) * per], np.int64) for r in range(self.t)))
        self.layout.rank_consts[starts.name] = starts
        self.layout.rank_consts[ends.name] = ends
        axes = self.new_const(f"{out}.axes", np.array([axis], np.int64))
        self._pre.append(helper.make_node("Slice", [name, starts.name, ends.name, axes], [out], name=f"{out}.slice"))
        return out

    def _elementwise(self, node, ins):
        out = node.output[0]
        axes = {(self._out_axis(x, st, out), st.blocks) for x, st in zip(node.input, ins) if st.kind == "S"}
        if len(axes) != 1 or None in {a for a, _ in axes}:
            return None
        axis, blocks = axes.pop()
        return self._aligned(node, State("S", axis, blocks))

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
                if sb.axis != rb - 2 or sb.blocks != sa.blocks:
                    return None
                return self._partial(node, {})
            if self.is_weight(b) and rb == 2:
                return self._row(node, {1: (b, 0)}, blocks=sa.blocks)
            shape_b = self.shape(b)
            if len(sa.blocks) > 1 or not isinstance(shape_b[-2], int):
                return None
            return self._partial(node, {1: self._slice_node(node, 1, rb - 2, shape_b[-2])})
        if sb.kind == "S" and sb.axis == rb - 2:
            return None  # B sharded on K but A whole: slicing A to match is possible but not worth a rule
        out_axes = set()  # rows of A, columns of B, or a batch axis of either
        if sa.kind == "S":
            out_axes.add((rout - 2 if sa.axis == ra - 2 else rout - ra + sa.axis, sa.blocks))
        if sb.kind == "S":
            out_axes.add((rout - 1 if sb.axis == rb - 1 else rout - rb + sb.axis, sb.blocks))
        if len(out_axes) != 1:
            return None
        axis, blocks = out_axes.pop()
        s_out = State("S", axis, blocks)
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
            replace[k] = self._slice_node(node, k, pos, shape[pos])
        return self._keep(node, [s_out], replace)

    def _partial(self, node, replace):
        local = self._local_reads(node)
        self._set(node, [State("P")])
        return Rewrite([self._renamed(node, replace)], "local", local_reads=local)

    def _row(self, node, weights: dict[int, tuple[str, int]], *, bias: int | None = None, blocks=()):
        """Take the rows (input channels) of each weight matching the sharded input; the output is partial and
        the bias, if any, is added once after the sum."""
        replace = {}
        for k, (name, axis) in weights.items():
            shape = self.shape(name)
            replace[k] = self.weight(name, axis, blocks or (shape[axis],))
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
                             blocks=ins[0].blocks)
        return None

    def _reshape(self, node, s: State) -> Rewrite | None:
        if len(s.blocks) > 1:
            return None
        src, out = self.shape(node.input[0]), self.shape(node.output[0])
        if not src or not out:
            return None
        if node.op_type == "Expand":
            axis = len(out) - len(src) + s.axis
            target = out[axis]
            values = self._shape_values(node.input[1])
            if values is None:
                return None
            vals, rebuild = values
            pos = axis - (len(out) - len(vals))
            if pos < 0 or vals[pos] in (1, -1):
                return self._keep(node, [State("S", axis)])
            if vals[pos] != target:
                return None
            vals = list(vals)
            vals[pos] = target // self.t
            return self._keep(node, [State("S", axis)], {1: rebuild(np.array(vals, np.int64))})
        group = _reshape_group(src, out, s.axis)
        if group is None:
            return None
        axis = group
        self.divides(out[axis], f"output dim {axis} (a head count, in attention)", node)
        values = self._shape_values(node.input[1])
        if values is None:
            return None
        vals, rebuild = values
        vals = list(int(v) for v in vals)
        if len(vals) != len(out):
            return None
        if s.axis < len(vals) and vals[s.axis] in (0, -2) and s.axis != axis:
            return None  # a copied or computed entry would hold the rank's size where the whole size is meant
        if vals[axis] == -1 or (vals[axis] == 0 and axis == s.axis):
            return self._keep(node, [State("S", axis)])
        if vals[axis] != out[axis]:
            return None
        vals[axis] //= self.t
        return self._keep(node, [State("S", axis)], {1: rebuild(np.array(vals, np.int64))})

    def _shape_values(self, name: str):
        """A shape input's values and how to make a per-rank copy: a constant, or a Concat whose parts are
        constants or computed dims (computed parts are kept; only constant parts may be rewritten)."""
        v = self.const(name)
        if v is not None:
            return list(v.reshape(-1)), lambda new: self.new_const(name, new)
        prod = self.g.producer.get(name)
        if prod is None or self.g.nodes[prod].op_type != "Concat":
            return None
        concat = self.g.nodes[prod]
        parts, vals = [], []
        for x in concat.input:
            c = self.const(x)
            if c is None:
                shape = self.shape(x)
                if not shape or len(shape) != 1 or not isinstance(shape[0], int):
                    return None
                parts.append((x, shape[0], None))
                vals += [None] * shape[0]
            else:
                parts.append((x, c.size, c.reshape(-1)))
                vals += [int(q) for q in c.reshape(-1)]

        def rebuild(new):
            inputs, at = [], 0
            for x, n, c in parts:
                chunk = new[at:at + n]
                if c is not None and not np.array_equal(chunk, c):
                    inputs.append(self.new_const(x, chunk.astype(c.dtype)))
                else:
                    inputs.append(x)
                at += n
            out = f"{name}@tp.{self.i}"
            self._pre.append(helper.make_node("Concat", inputs, [out], name=f"{concat.name}@tp.{self.i}", axis=0))
            return out

        # Computed entries count as "copied" (-2): never the sharded axis' entry.
        return [(-2 if x is None else x) for x in vals], lambda new: rebuild(np.array(new, np.int64))

    def _split(self, node, s: State) -> Rewrite | None:
        rank = len(self.shape(node.input[0]) or ())
        axis = self.attr(node, "axis", 0) % max(rank, 1)
        if axis != s.axis:
            return self._keep(node, [s] * len(node.output))
        sizes = self._split_sizes(node)
        if sizes is None:
            n = len(node.output)
            if len(s.blocks) not in (1, n) or (len(s.blocks) == n and len(set(s.blocks)) != 1):
                return None
            return self._keep(node, [State("S", axis)] * n)
        if tuple(sizes) != s.blocks:
            return None
        local = [x // self.t for x in sizes]
        if self.opset >= 13:
            rw = self._keep(node, [State("S", axis)] * len(node.output),
                            {1: self.new_const(node.input[1], np.array(local, np.int64))})
        else:
            rw = self._keep(node, [State("S", axis)] * len(node.output))
            for a in rw.nodes[0].attribute:
                if a.name == "split":
                    del a.ints[:]
                    a.ints.extend(local)
        return rw

    def _unsqueeze_squeeze(self, node, s: State) -> Rewrite | None:
        src, out = self.shape(node.input[0]), self.shape(node.output[0])
        if not src or out is None:
            return None
        axes = self._axes(node)
        if axes is None:
            return None
        if node.op_type == "Unsqueeze":
            axes = sorted(int(a) % len(out) for a in axes)
            kept = [k for k in range(len(out)) if k not in axes]
            return self._keep(node, [State("S", kept[s.axis], s.blocks)])
        axes = {int(a) % len(src) for a in axes}
        if s.axis in axes:
            return None
        return self._keep(node, [State("S", s.axis - sum(a < s.axis for a in axes), s.blocks)])

    def _axes(self, node) -> list[int] | None:
        """The ``axes`` of an Unsqueeze/Squeeze/Reduce: the attribute (older opsets) or the constant input."""
        axes = self.attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            axes = None if c is None else list(c)
        return axes

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
        return self._keep(node, [State("S", axis, s.blocks)])

    def _concat(self, node, ins) -> Rewrite | None:
        out = node.output[0]
        rank = len(self.shape(out) or ())
        axis = self.attr(node, "axis", 0) % max(rank, 1)
        sharded = {(st.axis, st.blocks) for st in ins if st.kind == "S"}
        if len(sharded) != 1:
            return None
        s_axis, blocks = sharded.pop()
        if s_axis == axis:
            return None
        return self._aligned(node, State("S", s_axis, blocks))


def _reshape_group(src, out, axis: int) -> int | None:
    """The output axis a reshape moves the leading part of input ``axis`` to, when the dims around it factor into
    matching groups (symbolic dims must map one to one); ``None`` otherwise."""
    i = j = 0
    while i < len(src) and j < len(out):
        if not isinstance(src[i], int) or not isinstance(out[j], int):
            if src[i] is None or src[i] != out[j]:
                return None
            if i == axis:
                return j
            i, j = i + 1, j + 1
            continue
        i2, j2, a, b = i + 1, j + 1, src[i], out[j]
        while a != b:
            if a < b and i2 < len(src) and isinstance(src[i2], int):
                a, i2 = a * src[i2], i2 + 1
            elif b < a and j2 < len(out) and isinstance(out[j2], int):
                b, j2 = b * out[j2], j2 + 1
            else:
                return None
        if i <= axis < i2:
            if any(src[k] != 1 for k in range(i, axis)):
                return None  # the sharded axis must lead its group, or a rank's chunk is not contiguous
            return next((k for k in range(j, j2) if out[k] != 1), None)
        i, j = i2, j2
    return None


def _multi(blocks: tuple[int, ...]) -> tuple[int, ...]:
    """A sharded state records blocks only when there are several."""
    return tuple(blocks) if len(blocks) > 1 else ()


def _unsqueeze(src, dst, axis, opset, p: _Pass):
    if opset >= 13:
        axes = p.new_const(f"{dst}.axes", np.array([axis], np.int64))
        return helper.make_node("Unsqueeze", [src, axes], [dst], name=f"{dst}.unsqueeze")
    return helper.make_node("Unsqueeze", [src], [dst], name=f"{dst}.unsqueeze", axes=[axis])


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _annotate(nodes: list[onnx.NodeProto], degree: int, weights: dict[str, WeightSlice]) -> None:
    """ONNX IR v11 ``sharding_spec``: which weights of a split node are sliced, along which axis, over T devices,
    and which of its values are rank-local."""
    for node in nodes:
        specs = []
        for name in list(node.input) + list(node.output):
            if name in weights:
                specs.append(onnx.ShardingSpecProto(
                    tensor_name=name, device=list(range(degree)),
                    sharded_dim=[onnx.ShardedDimProto(axis=weights[name].axis, simple_sharding=[
                        onnx.SimpleShardedDimProto(num_shards=degree)])]))
            elif name.endswith(("@shard", "@partial")):
                specs.append(onnx.ShardingSpecProto(tensor_name=name, device=list(range(degree))))
        if specs:
            node.device_configurations.add(configuration_id=TP_CONFIG, sharding_spec=specs)


@dataclass
class StepGraph:
    """One step of a tensor-parallel stage before it is written: rank-generic nodes, the reduces before them,
    and the names the step model reads, makes and hands on."""

    index: int
    ranks: int
    nodes: list[onnx.NodeProto]
    reduces: list[Reduce]
    inputs: list[str]
    outputs: list[str]
    carry: list[str]


def split_steps(layout: Layout, lo: int, hi: int, stage_inputs: list[str], stage_sends: list[str],
                constants: set[str], typed: Callable[[str], bool]) -> list[StepGraph]:
    """Cut nodes ``[lo, hi)`` of the layout into steps at the reduces. Step ``j`` holds the nodes that need ``j``
    reduces before them; a node reading a sharded value whole waits for the step after the one that made it.
    ``stage_sends`` (outputs and carried names) leave the last step whole. ``constants`` are names a step model
    holds itself (initializers, constants, weight slices); ``typed`` says whether a value's type is known."""
    nodes = [n for rw in layout.rewrites[lo:hi] for n in rw.nodes]
    level = dict.fromkeys(stage_inputs, 0)
    reduce_level: dict[str, int] = {}

    def level_of(name: str) -> int:
        if name in level:
            return level[name]
        red = layout.reduces.get(name)
        if red is not None and red.source in level:
            level[name] = reduce_level[name] = level[red.source] + 1
            return level[name]
        return 0  # a constant

    node_level = []
    for node in nodes:
        lv = max((level_of(r) for r in node_reads(node)), default=0)
        node_level.append(lv)
        level.update((o, lv) for o in node.output if o)
    # Helper nodes (local slices, rebuilt shapes, bias reshapes) run in the step of their first reader, so only
    # values with a known type cross between steps.
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for r in node_reads(node):
            readers.setdefault(r, []).append(i)
    for i in reversed(range(len(nodes))):
        outs = [o for o in nodes[i].output if o]
        if outs and not any(typed(o) for o in outs):
            later = [node_level[u] for o in outs for u in readers.get(o, ())]
            if later and min(later) > node_level[i]:
                node_level[i] = min(later)
                level.update((o, node_level[i]) for o in outs)
    for name in stage_sends:
        if name not in level:
            red = layout.reduce_for(name)
            if red is None or red.source not in level:
                raise AssertionError(f"stage output {name!r} is made by no node of the stage")
            level_of(name)
    last = max(list(level.values()) + [0])
    need: dict[str, int] = {}
    for node, lv in zip(nodes, node_level):
        for r in node_reads(node):
            need[r] = max(need.get(r, -1), lv)
    for name, lv in reduce_level.items():
        need[layout.reduces[name].source] = max(need.get(layout.reduces[name].source, -1), lv)
    for name in stage_sends:
        need[name] = last + 1
    steps = []
    for j in range(last + 1):
        here = [n for n, lv in zip(nodes, node_level) if lv == j]
        made = [o for n in here for o in n.output if o]
        made_set = set(made)
        reads = dict.fromkeys(r for n in here for r in node_reads(n))
        inputs = [r for r in reads if r not in made_set and r not in constants]
        outputs = [o for o in made if need.get(o, -1) > j]
        available = [x for x, lv in level.items() if x not in made_set and lv <= j and (
            x in stage_inputs or x in reduce_level or lv < j)]
        carry = [x for x in available if need.get(x, -1) > j and x not in outputs]
        reduces = [layout.reduces[x] for x, lv in reduce_level.items() if lv == j]
        ranks = 1 if j == last else layout.degree
        steps.append(StepGraph(j, ranks, here, reduces, inputs, outputs, carry))
    return steps
