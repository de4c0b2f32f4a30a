"""Graph analysis: what each top-level node reads (outer-scope names of its subgraphs included), in a stable
topological order, with Constant nodes set aside to be replicated into every stage that reads them."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxshard.errors import ModelError
from onnxshard.partitioner.model import subgraphs

STAGE_CONFIG = "onnxshard"  # configuration_id onnxshard writes into device_configurations


@dataclass
class Graph:
    """A model's top-level graph, analysed. ``nodes`` excludes the Constant nodes held in ``constants``."""

    model: onnx.ModelProto
    folder: Path
    nodes: list[onnx.NodeProto]
    reads: list[tuple[str, ...]]
    constants: dict[str, onnx.NodeProto]
    initializers: dict[str, onnx.TensorProto]
    inputs: list[str]
    outputs: list[str]
    producer: dict[str, int] = field(default_factory=dict)

    def pinned_stages(self) -> list[int | None]:
        """The ``pipeline_stage`` each node was given in the model (ONNX IR v11 device configurations)."""
        pins: list[int | None] = []
        for node in self.nodes:
            stages = {c.pipeline_stage for c in node.device_configurations if c.HasField("pipeline_stage")}
            if len(stages) > 1:
                raise ModelError(f"node {node.name!r} has conflicting pipeline_stage annotations {sorted(stages)}")
            pins.append(stages.pop() if stages else None)
        return pins


def analyse(model: onnx.ModelProto, folder: Path) -> Graph:
    g = model.graph
    _name_nodes(g)
    initializers = {t.name: t for t in g.initializer}
    initializers.update({t.values.name: t.values for t in g.sparse_initializer})
    inputs = [v.name for v in g.input if v.name not in initializers]
    outputs = [v.name for v in g.output]
    out_set = set(outputs)
    constants, rest = {}, []
    for node in g.node:
        if _is_constant(node) and node.output[0] not in out_set:
            constants[node.output[0]] = node
        else:
            rest.append(node)
    reads = [node_reads(n) for n in rest]
    order = _topological_order(rest, reads, set(inputs) | set(initializers) | set(constants))
    nodes = [rest[i] for i in order]
    reads = [reads[i] for i in order]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    for name in outputs:
        if name not in producer and name not in inputs and name not in initializers and name not in constants:
            raise ModelError(f"graph output {name!r} is produced by no node")
    return Graph(model, folder, nodes, reads, constants, initializers, inputs, outputs, producer)


def node_reads(node: onnx.NodeProto) -> tuple[str, ...]:
    """The node's inputs plus every outer-scope name its If/Loop/Scan subgraphs read, recursively."""
    names = [i for i in node.input if i]
    for sub in subgraphs(node):
        names.extend(outer_reads(sub))
    return tuple(dict.fromkeys(names))


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: list[str] = []
    for node in graph.node:
        used.extend(n for n in node_reads(node) if n not in defined)
        defined.update(node.output)
    used.extend(v.name for v in graph.output if v.name not in defined)
    return used


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.input and len(node.output) == 1


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed (or duplicate-named) nodes stable unique names, so costs, profiles and annotations can refer
    to them."""
    taken = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
        seen.add(node.name)


def _topological_order(nodes, reads, available: set[str]) -> list[int]:
    """Kahn's algorithm, always taking the earliest-listed ready node, so a sorted graph keeps its order."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, names in enumerate(reads):
        deps = {producer[n] for n in names if n in producer and n not in available}
        missing = [n for n in names if n not in producer and n not in available]
        if missing:
            raise ModelError(f"node {nodes[i].name!r} reads {missing[0]!r}, which no node, input or initializer "
                             "provides; the model is malformed")
        deps.discard(i)
        waiting[i] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i].name for i in range(len(nodes)) if waiting[i])
        raise ModelError(f"the graph has a cycle through node {stuck!r}; ONNX graphs must be acyclic")
    return order
