"""The plan's shape decided, before anything is written: a frozen value (the analysis it was made from, the
stage bounds, the tensor-parallel layout, the memory cap, the per-node FLOPs and where the balance costs came from).
``decide`` is pure: model metadata and options in, a :class:`Decision` out."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxshard.errors import PlanError
from onnxshard.kv_pairs import KvPair
from onnxshard.partitioner import cost as costmod
from onnxshard.partitioner import kv
from onnxshard.partitioner import tensor_parallel as tp
from onnxshard.partitioner.analysis import Analysis, ordered_by_pins
from onnxshard.partitioner.boundaries import (
    check_tp_cuts,
    choose_degree,
    cut_bytes_of,
    fewest,
    forbid_rank_local_cuts,
    manual_bounds,
    most_stages,
    shared_weights,
)
from onnxshard.partitioner.cuts import boundary_costs, choose_bounds, choose_shape
from onnxshard.units import human_bytes


@dataclass(frozen=True)
class Decision:
    """Stage ``k`` runs nodes ``bounds[k]:bounds[k + 1]`` of ``analysis.graph`` (reordered by pins if every node
    is pinned); ``layout`` splits them over its degree's ranks (``None``: one worker per stage)."""

    analysis: Analysis
    bounds: tuple[int, ...]
    layout: tp.Layout | None
    cap: float  # weight bytes per worker (inf: no cap)
    flops: tuple[float, ...]  # per node
    work: tuple[float, ...]  # per node: FLOPs plus the bytes moved, in FLOP-equivalents (what analytic cuts balance)
    cost_source: str  # "analytic" or "profile"
    kv_pairs: tuple[KvPair, ...] = ()  # a decoder's cache pairs (found by name, or given)
    replicas: int = 1  # copies of the stages a Pipeline runs by default (chosen for ``workers``)
    boundary_work: tuple[float, ...] = ()  # per stage: the bytes it reads and sends on, in FLOP-equivalents


def decide(analysis: Analysis, *, stages: int | None = None, cuts: Sequence[str] = (),
           max_stage_memory: int | None = None, node_times: dict[str, float] | None = None,
           tensor_parallel: int | None = None, kv_pairs: dict[str, str] | None = None,
           workers: int | None = None) -> Decision:
    """Choose the stage bounds (and the tensor-parallel layout): see :func:`onnxshard.partitioner.partition`."""
    pins = analysis.graph.pinned_stages()
    if pins and all(p is not None for p in pins):  # the caller's analysis stays as it was
        analysis = dataclasses.replace(analysis, graph=ordered_by_pins(analysis.graph, pins))
        pins = analysis.graph.pinned_stages()
    graph = analysis.graph
    costs = analysis.costs
    n = len(graph.nodes)
    balance = [node_times.get(node.name, 0.0) for node in graph.nodes] if node_times else [c.work for c in costs]
    cut_bytes = cut_bytes_of(graph, analysis.specs, analysis.dims)
    pairs = kv.find_pairs(graph.inputs, graph.outputs, kv_pairs)
    # A decoder with a KV cache is split to generate: each stage keeps its cache, the last samples the logits in
    # place, and only the hidden state (a few KB a token) crosses a cut; the per-byte costs are for models whose
    # activations and outputs travel.
    byte_flops = (0.0, 0.0) if pairs else (costmod.SEND_BYTE_FLOPS, costmod.RECEIVE_BYTE_FLOPS)
    edges = costmod.in_balance_units(byte_flops, balance, [c.work for c in costs])
    caches = kv.uncuttable(graph, pairs)
    for first, last, _ in caches:  # a decoder's layer keeps its cache and the attention over it in one stage
        cut_bytes[first:last + 1] = np.inf
    cap = float(max_stage_memory) if max_stage_memory else np.inf
    pin_stages = 1 + max((p for p in pins if p is not None), default=-1)
    if tensor_parallel is not None and tensor_parallel < 1:
        raise PlanError(f"--tensor-parallel must be at least 1 (got {tensor_parallel})")
    if tensor_parallel is None and np.isfinite(cap) and not cuts:
        tensor_parallel = choose_degree(analysis, balance, [c.param_bytes for c in costs], cut_bytes, cap, pins,
                                         stages)
    layout = None
    params = [c.param_bytes for c in costs]
    if tensor_parallel and tensor_parallel > 1:
        layout = tp.shard_graph(graph, analysis.specs, tensor_parallel)
        if not layout.splits:
            why = ": " + "; ".join(note for _, note in layout.notes) if layout.notes else \
                " (no top-level MatMul/Gemm/Conv/Gather with a weight initializer)"
            raise PlanError(f"--tensor-parallel {tensor_parallel} splits no layer of this model{why}; use 1 or "
                            "another degree")
        params = layout.node_param_bytes(graph)
        cut_bytes = forbid_rank_local_cuts(cut_bytes, graph, layout)

    shared = shared_weights(graph) if layout is None else ()  # a rank's weights are counted by its layout
    if cuts:
        bounds = manual_bounds(graph, cuts, stages)
        for first, last, present in caches:
            inside = [b for b in bounds[1:-1] if first <= b <= last]
            if inside:
                raise PlanError(f"a --cut at {graph.nodes[inside[0] - 1].output[0]!r} falls inside the attention "
                                f"over {present!r}: each layer's KV cache and the attention reading it stay in one "
                                f"stage; cut after {graph.nodes[first - 2].output[0]!r} or after "
                                f"{graph.nodes[last].output[0]!r}")
    else:
        most, blocking = most_stages(graph, analysis.specs, cut_bytes)
        if stages is None and workers is not None and not pin_stages:
            shape = choose_shape(balance, params, cut_bytes, workers, degree=tensor_parallel or 1, max_memory=cap,
                                 most=most, shared=shared, edges=edges)
            if shape is None:
                raise PlanError(f"no shape of {workers} workers keeps each stage under --max-stage-memory "
                                f"{human_bytes(cap)}; add workers or raise the cap")
            stages = shape[0]
        if stages is None:
            stages = pin_stages or (fewest(graph, balance, params, cut_bytes, cap, pins, shared) if np.isfinite(cap)
                                    else 1)
        if pin_stages > stages:
            raise PlanError(f"the model pins nodes to pipeline_stage {pin_stages - 1}, but only {stages} stages "
                            f"were asked for; use --stages {pin_stages}")
        if stages > most:
            why = f"the model has {n} nodes to place (Constants aside)"
            if most < n:
                shown = ", ".join(repr(x) for x in blocking[:5]) + (", ..." if len(blocking) > 5 else "")
                why += (f", and {n - most} of the {n - 1} places between them cannot be cut (" +
                        (f"values that cannot cross a stage boundary, sequences, optionals or float8/int4 "
                         f"tensors, cross them: {shown}" if blocking else
                         "they fall inside tensor-parallel layers") + ")")
            raise PlanError(f"{why}; it cannot make {stages} stages: use --stages {most} or fewer")
        bounds = choose_bounds(balance, params, cut_bytes, stages, max_memory=cap, pins=pins, shared=shared,
                               edges=edges)
        if bounds is None and layout is not None and not np.isfinite(cap):
            raise PlanError(f"no {stages}-stage split keeps each tensor-parallel layer inside one stage (a cut may "
                            f"not fall between a split layer's halves); use fewer stages or --tensor-parallel 1")
        if bounds is None:
            why = f"--max-stage-memory {human_bytes(cap)}" if np.isfinite(cap) else "the pipeline_stage annotations"
            raise PlanError(f"no {stages}-stage split satisfies {why}; raise the cap, add stages, or fix the "
                            "annotations")
    if layout is not None:
        check_tp_cuts(graph, layout, bounds)
    replicas = 1
    if workers is not None:
        per_replica = (len(bounds) - 1) * (tensor_parallel or 1)
        replicas = workers // per_replica
        if replicas < 1:
            raise PlanError(f"--workers {workers} cannot hold one copy of {len(bounds) - 1} stage(s) x "
                            f"{tensor_parallel or 1} rank(s); give at least {per_replica} workers")
    boundary = boundary_costs(cut_bytes, bounds, byte_flops)
    return Decision(analysis, tuple(bounds), layout, cap, tuple(c.flops for c in costs),
                    tuple(c.work for c in costs),
                    "profile" if node_times else "analytic", pairs, replicas, tuple(boundary))
