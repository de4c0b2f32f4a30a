"""The tensor-parallel layout: each tensor's state (replicated, sharded, partial), the weight slices and
rank constants, what each node becomes on a rank, and the reduces that make values whole."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from onnxshard.partitioner.graph import Graph
from onnxshard.partitioner.model import node_tensors, tensor_nbytes
from onnxshard.plans import Reduce, TensorSpec, shares, starts

TP_CONFIG = "onnxshard.tp"  # configuration_id of the sharding_spec annotations onnxshard writes


@dataclass(frozen=True)
class State:
    kind: str  # "R", "S" or "P"
    axis: int = 0
    blocks: tuple[int, ...] = ()  # S: global sizes of the blocks along ``axis`` (one block if empty)
    unit: int = 1  # S: each block is cut in whole units of this many (a head's width), as evenly as they go

    @property
    def split(self) -> tuple[tuple[int, ...], int]:
        """What two sharded values must share to be combined rank by rank (the axis aside)."""
        return self.blocks, self.unit

    def at(self, axis: int) -> State:
        """The same split, moved to ``axis`` (a transpose, a squeeze)."""
        return replace(self, axis=axis)


REPLICATED = State("R")


class Regrain(Exception):  # noqa: N818 - a signal to the pass, not an error
    """Make the splits begun at node positions ``starts`` again in whole units of ``unit`` (a head's width that a
    reshape downstream showed: an uneven split must not cut a head)."""

    def __init__(self, starts, unit: int):
        super().__init__(f"split in units of {unit}")
        self.starts, self.unit = frozenset(starts), unit


def splittable(size, degree: int, unit: int = 1) -> bool:
    """Whether ``size`` cuts into ``degree`` parts of at least one whole unit each."""
    return isinstance(size, int) and size > 0 and size % unit == 0 and size // unit >= degree


def even_unit(sizes, degree: int, unit: int) -> int:
    """``unit``, or 1 when every size cuts evenly anyway (so equal splits compare equal whatever their unit)."""
    return 1 if all((b // unit) % degree == 0 for b in sizes) else unit


@dataclass(frozen=True)
class WeightSlice:
    """Rank ``r`` holds chunk ``r`` of each block of ``source`` along ``axis``."""

    source: str
    axis: int
    blocks: tuple[int, ...]
    unit: int = 1

    @property
    def name(self) -> str:
        suffix = "" if len(self.blocks) == 1 else ".b" + "_".join(map(str, self.blocks))
        return f"{self.source}@tp{self.axis}{suffix}" + (f".u{self.unit}" if self.unit != 1 else "")

    def contiguous(self, dims) -> bool:
        """Whether each rank's slice is one byte range of the source (leading axis, one block)."""
        return len(self.blocks) == 1 and all(d == 1 for d in dims[:self.axis])

    def chunks(self, rank: int, degree: int) -> list[tuple[int, int]]:
        """Rank ``rank``'s (start, length) along the axis, one per block."""
        at, out = 0, []
        for b in self.blocks:
            out.append((at + starts(b, degree, self.unit)[rank], shares(b, degree, self.unit)[rank]))
            at += b
        return out

    def size(self, rank: int, degree: int) -> int:
        """How much of the axis rank ``rank`` holds."""
        return sum(n for _, n in self.chunks(rank, degree))

    def even(self, degree: int) -> bool:
        return all(len(set(shares(b, degree, self.unit))) == 1 for b in self.blocks)


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
    notes: list[tuple[frozenset[int], str]]  # why layers stayed whole: the node positions it concerns, the reason

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
        s = self.states.get(base, REPLICATED)
        if suffix == "shard" and shape is not None and isinstance(shape[s.axis], int):
            whole = WeightSlice(base, s.axis, s.blocks or (shape[s.axis],), s.unit)  # the value cut as a weight is
            per_rank = {whole.size(r, self.degree) for r in range(self.degree)}
            local = per_rank.pop() if len(per_rank) == 1 else None  # uneven: the ranks differ, typed unknown
            shape = shape[:s.axis] + (local,) + shape[s.axis + 1:]
        return TensorSpec(name, spec.dtype, shape)

    def reduce_for(self, name: str) -> Reduce | None:
        """The reduce that makes ``name`` whole, when it is sharded or partial."""
        if name in self.reduces:
            return self.reduces[name]
        s = self.states.get(name, REPLICATED)
        if s.kind == "R":
            return None
        op = "sum" if s.kind == "P" else "concat"
        return self.reduces.setdefault(name, Reduce(name, self.local(name), op, s.axis, s.blocks, s.unit))

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



def rank_bytes(graph: Graph, layout: Layout, name: str, rank: int = 0) -> int:
    """Bytes rank ``rank`` holds for the weight (or weight slice) ``name`` (rank 0 holds the most)."""
    if name in layout.weights:
        ws = layout.weights[name]
        return tensor_bytes(graph, ws.source) * ws.size(rank, layout.degree) // sum(ws.blocks)
    return tensor_bytes(graph, name)


def tensor_bytes(graph: Graph, name: str) -> int:
    if name in graph.initializers:
        return tensor_nbytes(graph.initializers[name])
    node = graph.constants.get(name)
    return sum(tensor_nbytes(t) for t in node_tensors(node)) if node else 0



def multi_blocks(blocks: tuple[int, ...]) -> tuple[int, ...]:
    """A sharded state records blocks only when there are several."""
    return tuple(blocks) if len(blocks) > 1 else ()



def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def annotate(nodes: list[onnx.NodeProto], degree: int, weights: dict[str, WeightSlice]) -> None:
    """ONNX IR v11 ``sharding_spec``: which weights of a split node are sliced, along which axis, over T devices,
    and which of its values are rank-local."""
    for node in nodes:
        specs = []
        for name in list(node.input) + list(node.output):
            if name in weights and weights[name].even(degree):  # the spec has no uneven shards
                specs.append(onnx.ShardingSpecProto(
                    tensor_name=name, device=list(range(degree)),
                    sharded_dim=[onnx.ShardedDimProto(axis=weights[name].axis, simple_sharding=[
                        onnx.SimpleShardedDimProto(num_shards=degree)])]))
            elif name.endswith(("@shard", "@partial")):
                specs.append(onnx.ShardingSpecProto(tensor_name=name, device=list(range(degree))))
        if specs:
            node.device_configurations.add(configuration_id=TP_CONFIG, sharding_spec=specs)
