"""A model loaded lazily and analysed: its graph, tensor specs, dim sizes and per-node costs; and the
reordering of a fully pinned graph by stage (a new Graph: the caller's analysis is never changed)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxshard.errors import PlanError
from onnxshard.partitioner import cost as costmod
from onnxshard.partitioner.graph import Graph, analyse
from onnxshard.partitioner.model import load_lazy
from onnxshard.plans import NON_TENSOR, TensorSpec

TypeOracle = Callable[[onnx.ModelProto, Path, list[str]], dict[str, TensorSpec]]


@dataclass
class Analysis:
    """A model loaded lazily and analysed: graph, tensor specs and per-node costs."""

    path: Path
    graph: Graph
    specs: dict[str, TensorSpec]
    dims: dict[str, int]

    @property
    def costs(self) -> list[costmod.NodeCost]:
        return costmod.node_costs(self.graph, self.specs, self.dims)


def analyse_model(path: str | os.PathLike, *, dims: dict[str, int] | None = None,
                  type_oracle: TypeOracle | None = None, allow_domains: Iterable[str] = ()) -> Analysis:
    """Load ``path`` without weight bytes, infer types and shapes, and estimate each node's cost."""
    path = Path(path)
    model = load_lazy(path, allow_domains=frozenset(allow_domains))
    graph = analyse(model, path.parent)
    specs = costmod.infer_specs(graph)
    untyped = [x for x in graph.inputs + [o for n in graph.nodes for o in n.output if o]
               if x not in specs or specs[x].shape is None]
    if untyped and type_oracle is not None:
        specs = costmod.infer_specs(graph, known=type_oracle(graph.model, graph.folder, untyped))
    return Analysis(path, graph, specs, costmod.infer_dim_sizes(graph, specs, dict(dims or {})))


def input_specs(path: str | os.PathLike) -> tuple[TensorSpec, ...]:
    """The model's inputs as it declares them (initializers left out), read without weights or shape inference."""
    g = load_lazy(Path(path)).graph
    weights = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    inputs = [v for v in g.input if v.name not in weights]
    return tuple(costmod.spec_from_value_info(v) or TensorSpec(v.name, NON_TENSOR, None) for v in inputs)


def ordered_by_pins(graph: Graph, pins: list[int]) -> Graph:
    """With every node pinned, a copy of ``graph`` with its nodes ordered by stage (stable), refusing a pin that
    reads from a later stage."""
    stage_of = {o: p for node, p in zip(graph.nodes, pins) for o in node.output}
    for node, reads, p in zip(graph.nodes, graph.reads, pins):
        late = [r for r in reads if stage_of.get(r, -1) > p]
        if late:
            raise PlanError(f"node {node.name!r} is pinned to pipeline_stage {p} but reads {late[0]!r} from stage "
                            f"{stage_of[late[0]]}; fix the annotations")
    order = sorted(range(len(graph.nodes)), key=lambda i: (pins[i], i))
    nodes = [graph.nodes[i] for i in order]
    return dataclasses.replace(graph, nodes=nodes, reads=[graph.reads[i] for i in order],
                               producer={o: i for i, n in enumerate(nodes) for o in n.output if o})


