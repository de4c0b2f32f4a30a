"""Step splitting: a tensor-parallel stage's rewritten nodes cut into steps at the reduces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from onnxshard.partitioner.graph import node_reads
from onnxshard.partitioner.tensor_parallel.layout import Layout
from onnxshard.plans import Reduce


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
