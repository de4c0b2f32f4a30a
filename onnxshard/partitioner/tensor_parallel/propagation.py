"""The pass that decides every tensor's state: nodes in topological order, split points (``_start``), the
rules of ``rules.py`` for sharded inputs, and rollback of splits T does not divide."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshard.partitioner.cost import SMALL_INT_BYTES
from onnxshard.partitioner.graph import Graph
from onnxshard.partitioner.model import is_external, load_inline, tensor_nbytes
from onnxshard.partitioner.tensor_parallel.layout import (
    REPLICATED,
    Layout,
    RankConst,
    Regrain,
    Rewrite,
    State,
    WeightSlice,
    annotate,
    copy_node,
    even_unit,
    multi_blocks,
    splittable,
    tensor_bytes,
)
from onnxshard.partitioner.tensor_parallel.rules import RULES, UNARY, Rules
from onnxshard.partitioner.tensor_parallel.vocab import VOCAB_MIN_BYTES, Vocab
from onnxshard.plans import TensorSpec
from onnxshard.units import human_bytes

WHOLE_NOTE_BYTES = 1 << 20  # a weight this big that every rank holds whole gets a note saying why


class _Rollback(Exception):
    """Undo the splits begun at node positions ``starts``; the check failed at node position ``at``."""

    def __init__(self, message: str, starts: Iterable[int], at: int):
        super().__init__(message)
        self.starts, self.at = frozenset(starts), at


def shard_graph(graph: Graph, specs: dict[str, TensorSpec], degree: int) -> Layout:
    """Decide every tensor's state for ``degree`` ranks and rewrite each node for one rank."""
    excluded: set[int] = set()
    units: dict[int, int] = {}  # split point -> the unit its columns are cut in (1 unless regrained)
    notes: list[tuple[frozenset[int], str]] = []
    while True:
        try:
            return _Pass(graph, specs, degree, excluded, notes, units).run()
        except _Rollback as e:
            if not e.starts or e.starts <= excluded:
                raise AssertionError(f"tensor-parallel rollback made no progress: {e}") from None
            excluded |= e.starts
            notes.append((e.starts | {e.at}, str(e)))  # a note belongs to the stages of these nodes
        except Regrain as e:
            grown = {i: math.lcm(units.get(i, 1), e.unit) for i in e.starts}
            if not grown or all(units.get(i, 1) == u for i, u in grown.items()):
                raise AssertionError(f"tensor-parallel regrain made no progress: {e}") from None
            units.update(grown)



class _Pass(Rules, Vocab):
    """One pass over the graph with a fixed set of excluded split points."""

    def __init__(self, graph: Graph, specs, degree: int, excluded: set[int], notes: list[tuple[frozenset[int], str]],
                 units: dict[int, int]):
        self.g, self.specs, self.t, self.excluded, self.units = graph, specs, degree, excluded, units
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
        self._note_whole_weights()
        return self.layout

    def _note_whole_weights(self) -> None:
        """A note for each weight of ``WHOLE_NOTE_BYTES`` or more that every rank holds whole, with why."""
        rolled = {i for starts, _ in self.layout.notes for i in starts}
        seen: set[str] = set()
        for i, rw in enumerate(self.layout.rewrites):
            for n in rw.nodes:
                for name in n.input:
                    if name in seen or not self.is_weight(name) or tensor_bytes(self.g, name) < WHOLE_NOTE_BYTES:
                        continue
                    seen.add(name)
                    node = self.g.nodes[i]
                    why = ("its split was rolled back (see the note on this layer)" if i in rolled else
                           "no tensor-parallel rule splits this use of it")
                    self.layout.notes.append((frozenset({i}), (
                        f"weight {name!r} ({human_bytes(tensor_bytes(self.g, name))}) stays whole on every rank: "
                        f"node {node.name!r} ({node.op_type}) reads it whole; {why}")))

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

    def rank_const(self, base: str, values: list[np.ndarray]) -> str:
        """A constant whose value is ``values[r]`` on rank ``r`` (one plain constant when they agree)."""
        if all(np.array_equal(v, values[0]) for v in values):
            return self.new_const(base, values[0])
        name = f"{base}@rank"
        while name in self.layout.rank_consts:
            name += "_"
        self.layout.rank_consts[name] = RankConst(name, tuple(np.asarray(v) for v in values))
        return name

    def weight(self, name: str, axis: int, blocks: tuple[int, ...], unit: int = 1) -> str:
        ws = WeightSlice(name, axis, tuple(blocks), unit)
        self.layout.weights.setdefault(ws.name, ws)
        return ws.name

    def starts_of(self, node) -> frozenset[int]:
        """The split points whose sharded values reach ``node`` (or this node, when it is one)."""
        return frozenset().union(*(self.prov.get(x, frozenset()) for x in node.input if x)) or frozenset({self.i})

    def fits(self, size, what: str, node, unit: int = 1) -> None:
        """Roll back the splits that lead here (or this split itself) unless ``size`` cuts into T parts of at
        least one whole ``unit`` each (T need not divide it: the first ranks then take a unit more)."""
        if splittable(size, self.t, unit):
            return
        count = size // unit if isinstance(size, int) and size > 0 and size % unit == 0 else None
        valid = f"valid degrees: 1 to {count}" if count else "its size is unknown"
        raise _Rollback(f"node {node.name!r} ({node.op_type}): {what} {size} cannot be split over "
                        f"tensor_parallel={self.t} ({valid}); its layer stays replicated", self.starts_of(node),
                        self.i)

    def sharded(self, axis: int, blocks, unit: int = 1) -> State:
        """A sharded state, its unit dropped when every block cuts evenly anyway."""
        return State("S", axis, multi_blocks(tuple(blocks)), even_unit(blocks, self.t, unit))

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
            rule = Rewrite([copy_node(node)])
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
            annotate(rule.nodes, self.t, self.layout.weights)
        return rule

    def _set(self, node, states: list[State]) -> None:
        for out, s in zip(node.output, states):
            if out:
                self.states[out] = s

    def _renamed(self, node, replace: dict[int, str], *, drop_from: int | None = None) -> onnx.NodeProto:
        """A copy of ``node`` reading local names for its sharded inputs (``replace`` overrides by index) and
        writing local names for its sharded/partial outputs."""
        copy = copy_node(node)
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
        tied = self._transposed_weight(node.input[1]) if op == "MatMul" else None
        if op == "MatMul" and (self.is_weight(node.input[1]) or tied is not None):
            w = self.shape(node.input[1])
            out = self.shape(node.output[0])
            if not w or len(w) != 2 or not out or len(out) < 2:
                return None
            blocks, unit = self._blocks(node.output[0], w[1]), self.units.get(self.i, 1)
            for b in blocks:
                self.fits(b, "output width", node, unit)
            s = self.sharded(len(out) - 1, blocks, unit)
            self._set(node, [s])
            if tied is None:
                return Rewrite([self._renamed(node, {1: self.weight(node.input[1], 1, blocks, s.unit)})], "col")
            # B = Transpose(W): W's rows are B's columns. The rank transposes its own rows, and the whole
            # transpose goes when this was its only reader (an LM head tied to the embedding: one slice held).
            transpose, source = tied
            rows = f"{node.input[1]}@tied"
            nodes = [helper.make_node("Transpose", [self.weight(source, 0, blocks, s.unit)], [rows],
                                      name=f"{node.name}@tied", perm=[1, 0]),
                     self._renamed(node, {1: rows})]
            if self.consumers.get(node.input[1]) == [self.i]:
                self.layout.rewrites[transpose] = Rewrite([])
            return Rewrite(nodes, "col")
        if op == "Gemm" and self.is_weight(node.input[1]) and not self.attr(node, "transA", 0):
            w = self.shape(node.input[1])
            if not w or len(w) != 2:
                return None
            trans_b = self.attr(node, "transB", 0)
            n = w[0] if trans_b else w[1]
            blocks, unit = self._blocks(node.output[0], n), self.units.get(self.i, 1)
            for b in blocks:
                self.fits(b, "output width", node, unit)
            s = self.sharded(1, blocks, unit)
            replace = {1: self.weight(node.input[1], 0 if trans_b else 1, blocks, s.unit)}
            if len(node.input) > 2 and node.input[2]:
                c = self.shape(node.input[2])
                if c is None:
                    return None
                if c and c[-1] == n and self.is_weight(node.input[2]):
                    replace[2] = self.weight(node.input[2], len(c) - 1, blocks, s.unit)
                elif c and c[-1] != 1:
                    return None
            self._set(node, [s])
            return Rewrite([self._renamed(node, replace)], "col")
        if op == "Conv" and self.is_weight(node.input[1]) and self.attr(node, "group", 1) == 1:
            w = self.shape(node.input[1])
            if not w:
                return None
            self.fits(w[0], "output channels", node)
            s = self.sharded(1, (w[0],))
            replace = {1: self.weight(node.input[1], 0, (w[0],), s.unit)}
            if len(node.input) > 2 and node.input[2]:
                replace[2] = self.weight(node.input[2], 0, (w[0],), s.unit)
            self._set(node, [s])
            return Rewrite([self._renamed(node, replace)], "col")
        if op == "Gather" and self.is_weight(node.input[0]) and self.attr(node, "axis", 0) == 0:
            w = self.shape(node.input[0])
            if not w or len(w) != 2 or tensor_bytes(self.g, node.input[0]) < VOCAB_MIN_BYTES:
                return None
            self.fits(w[0], "vocabulary size", node)
            return self._vocab(node, w[0])
        return None

    def _transposed_weight(self, name: str) -> tuple[int, str] | None:
        """(the Transpose's position, the weight) when ``name`` is a 2-D weight transposed."""
        at = self.g.producer.get(name)
        if at is None:
            return None
        node = self.g.nodes[at]
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not self.is_weight(node.input[0]):
            return None
        w = self.shape(node.input[0])
        perm = self.attr(node, "perm")
        return (at, node.input[0]) if w and len(w) == 2 and (perm is None or list(perm) == [1, 0]) else None

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


    def _propagate(self, node, ins: list[State]) -> Rewrite | None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") and not (node.domain == "com.microsoft" and op in UNARY):
            return None
        rule = RULES.get(op)
        return None if rule is None else rule(self, node, ins, next(x for x in ins if x.kind == "S"))
