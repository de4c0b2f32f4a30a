"""Where stages may begin: bytes crossing each position, cuts named by hand, the fewest stages under a
memory cap, the tensor-parallel degree that fits, and the positions inside a split layer no cut may take."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from onnxshard.errors import PlanError
from onnxshard.partitioner import cost as costmod
from onnxshard.partitioner import tensor_parallel as tp
from onnxshard.partitioner.cuts import choose_bounds, cut_bytes_per_position, fewest_stages
from onnxshard.partitioner.graph import Graph
from onnxshard.partitioner.model import tensor_nbytes
from onnxshard.plans import NON_TENSOR
from onnxshard.units import human_bytes


def shared_weights(graph: Graph) -> list[tuple[int, list[int]]]:
    """``(bytes, reader positions)`` of each initializer that several nodes read (tied embeddings): a stage holds
    it when it holds any of them, which per-node first-reader counts miss."""
    readers: dict[str, list[int]] = {}
    for i, reads in enumerate(graph.reads):
        for name in dict.fromkeys(reads):
            if name in graph.initializers:
                readers.setdefault(name, []).append(i)
    return [(tensor_nbytes(graph.initializers[name]), at) for name, at in readers.items() if len(at) > 1]


def choose_degree(analysis, balance, params, cut_bytes, cap, pins, stages) -> int:
    """The tensor-parallel degree that fits ``cap`` with the fewest workers (stages x degree), smaller first."""
    best = None
    for degree in (1, 2, 4, 8):
        shared = ()
        if degree == 1:
            p, c, shared = params, cut_bytes, shared_weights(analysis.graph)
        else:
            layout = tp.shard_graph(analysis.graph, analysis.specs, degree)
            if not layout.splits:
                continue
            p, c = layout.node_param_bytes(analysis.graph), forbid_rank_local_cuts(cut_bytes, analysis.graph, layout)
        if stages is not None:
            fits = choose_bounds(balance, p, c, stages, max_memory=cap, pins=pins, shared=shared) is not None
            count = stages if fits else 0
        else:
            count = fewest_stages(balance, p, c, cap, pins=pins, shared=shared)
        if count and (best is None or count * degree < best[0]):
            best = (count * degree, degree)
    return best[1] if best else 1


def _rank_local_spans(graph: Graph, layout: tp.Layout):
    """(name, made at, last read at) of each sharded value read as each rank's slice: no cut may fall inside,
    since packets between stages carry whole values only."""
    for i, rw in enumerate(layout.rewrites):
        for name in rw.local_reads:
            yield name, graph.producer.get(name, -1), i


def forbid_rank_local_cuts(cut_bytes: np.ndarray, graph: Graph, layout: tp.Layout) -> np.ndarray:
    cut = np.array(cut_bytes, dtype=float)
    for _, made, last in _rank_local_spans(graph, layout):
        cut[made + 1:last + 1] = np.inf
    return cut


def check_tp_cuts(graph: Graph, layout: tp.Layout, bounds: list[int]) -> None:
    for name, made, last in _rank_local_spans(graph, layout):
        for b in bounds[1:-1]:
            if made < b <= last:
                raise PlanError(f"a cut before node {graph.nodes[b].name!r} falls inside a tensor-parallel layer "
                                f"({name!r} is sharded across ranks there); cut elsewhere")


def fewest(graph, balance, params, cut_bytes, cap, pins, shared=()) -> int:
    stages = fewest_stages(balance, params, cut_bytes, cap, pins=pins, shared=shared)
    if not stages:
        i = int(np.argmax(params))
        raise PlanError(f"no split meets --max-stage-memory {human_bytes(cap)}: node {graph.nodes[i].name!r} alone "
                        f"holds {human_bytes(params[i])} of weights; raise the cap or use tensor parallelism")
    return stages


def intervals(graph: Graph):
    """(made_at, last_read_at) for every value that can cross a cut; graph outputs are read 'at the end'."""
    n = len(graph.nodes)
    made = {name: -1 for name in graph.inputs}
    made.update({o: i for i, node in enumerate(graph.nodes) for o in node.output if o})
    last = dict.fromkeys(made, -2)
    for i, reads in enumerate(graph.reads):
        for r in reads:
            if r in last:
                last[r] = max(last[r], i)
    for name in graph.outputs:
        if name in last:
            last[name] = n
    return made, last


def cut_bytes_of(graph: Graph, specs, dims) -> np.ndarray:
    made, last = intervals(graph)
    names = list(made)
    sizes = []
    for name in names:
        spec = specs.get(name)
        sizes.append(np.inf if spec is not None and spec.dtype == NON_TENSOR else
                     costmod.tensor_bytes(spec, dims))
    return cut_bytes_per_position(len(graph.nodes), [(made[x], last[x]) for x in names], sizes)


def most_stages(graph: Graph, specs, cut_bytes) -> tuple[int, list[str]]:
    """The most stages ``graph`` can be cut into (one per node, less the places a value that cannot cross a stage
    boundary would have to cross: a sequence, an optional, a float8 or int4 tensor), and the names of those values."""
    n = len(graph.nodes)
    blocked = [p for p in range(1, n) if not np.isfinite(cut_bytes[p])]
    if not blocked:
        return max(1, n), []
    made, last = intervals(graph)
    names = [x for x in made if specs.get(x) is not None and specs[x].dtype == NON_TENSOR
             and any(made[x] < p <= last[x] for p in blocked)]
    return n - len(blocked), names


def manual_bounds(graph: Graph, cuts: Sequence[str], stages: int | None) -> list[int]:
    positions = []
    for name in cuts:
        if name not in graph.producer:
            close = difflib.get_close_matches(name, list(graph.producer), n=5)
            hint = f"; similar names: {close}" if close else "; `onnxshard inspect MODEL --tensors` lists them"
            raise PlanError(f"--cut {name!r} is not a tensor made by a node of the model{hint}")
        positions.append(graph.producer[name] + 1)
    positions = sorted(set(positions))
    if positions[-1] >= len(graph.nodes):
        raise PlanError(f"--cut {cuts[-1]!r} is made by the last node; nothing would be left for a later stage")
    if stages is not None and stages != len(positions) + 1:
        raise PlanError(f"{len(cuts)} --cut names make {len(positions) + 1} stages, but --stages {stages} was given")
    return [0, *positions, len(graph.nodes)]


