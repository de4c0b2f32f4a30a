"""Split an ONNX model into pipeline stages. Knows nothing of Ray or ONNX Runtime.

``partition`` is pure planning plus file writing: model metadata in, a saved :class:`~onnxshard.plans.Plan` out.
Whatever needs ONNX Runtime (measured costs, typing tensors shape inference cannot) comes in as plain data or a
callback from :mod:`onnxshard.api`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxshard.errors import PlanError
from onnxshard.partitioner import cost as costmod
from onnxshard.partitioner import tensor_parallel as tp
from onnxshard.partitioner.coupling import batch_coupled
from onnxshard.partitioner.cuts import choose_bounds, cut_bytes_per_position, fewest_stages
from onnxshard.partitioner.graph import Graph, analyse
from onnxshard.partitioner.model import is_external, iter_tensors, load_lazy, node_tensors, tensor_nbytes
from onnxshard.partitioner.out import check_out, replace_with
from onnxshard.partitioner.shards import StageGraph, WeightWriter, build_model, links_possible
from onnxshard.plans import Plan, Stage, Step, TensorSpec, Weights
from onnxshard.units import human_bytes

__all__ = ["Analysis", "analyse_model", "check_out", "input_specs", "partition"]

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
    return tuple(costmod.spec_from_value_info(v) or TensorSpec(v.name, "non-tensor", None) for v in inputs)


def partition(
    analysis: Analysis,
    out: str | os.PathLike,
    *,
    stages: int | None = None,
    cuts: Sequence[str] = (),
    max_stage_memory: int | None = None,
    node_times: dict[str, float] | None = None,
    copy_weights: bool = False,
    source: str | os.PathLike | None = None,
    tensor_parallel: int | None = None,
    hash_weights: bool = False,
) -> Plan:
    """Choose stage bounds and write the plan folder ``out`` (atomically: nothing half-written on error).

    ``node_times`` (node name -> measured seconds) replaces the analytic FLOP estimate as the balance cost.
    ``source`` is the model the plan reproduces, when ``analysis`` is of a rewritten copy of it.
    ``tensor_parallel`` splits every stage's layers over that many ranks; ``None`` with ``max_stage_memory``
    picks the degree (1, 2, 4 or 8) that fits in the fewest workers. ``hash_weights``: record a digest of every
    weight byte (see :meth:`Plan.save`).
    """
    out = Path(os.path.abspath(out))
    check_out(out, [analysis.path, Path(source or analysis.path)])
    pins = analysis.graph.pinned_stages()
    if pins and all(p is not None for p in pins):  # the caller's analysis stays as it was
        analysis = dataclasses.replace(analysis, graph=_ordered_by_pins(analysis.graph, pins))
        pins = analysis.graph.pinned_stages()
    graph = analysis.graph
    costs = analysis.costs
    n = len(graph.nodes)
    balance = [c.flops for c in costs]
    if node_times:
        balance = [node_times.get(node.name, 0.0) for node in graph.nodes]
    cut_bytes = _cut_bytes(graph, analysis.specs, analysis.dims)
    cap = float(max_stage_memory) if max_stage_memory else np.inf
    pin_stages = 1 + max((p for p in pins if p is not None), default=-1)
    if tensor_parallel is not None and tensor_parallel < 1:
        raise PlanError(f"--tensor-parallel must be at least 1 (got {tensor_parallel})")
    if tensor_parallel is None and np.isfinite(cap) and not cuts:
        tensor_parallel = _choose_degree(analysis, balance, [c.param_bytes for c in costs], cut_bytes, cap, pins,
                                         stages)
    layout = None
    params = [c.param_bytes for c in costs]
    if tensor_parallel and tensor_parallel > 1:
        layout = tp.shard_graph(graph, analysis.specs, tensor_parallel)
        if not layout.splits:
            why = ": " + "; ".join(layout.notes) if layout.notes else \
                " (no top-level MatMul/Gemm/Conv/Gather with a weight initializer)"
            raise PlanError(f"--tensor-parallel {tensor_parallel} splits no layer of this model{why}; use 1 or "
                            "another degree")
        params = layout.node_param_bytes(graph)
        cut_bytes = _forbid_rank_local_cuts(cut_bytes, graph, layout)

    if cuts:
        bounds = _manual_bounds(graph, cuts, stages)
    else:
        if stages is None:
            stages = pin_stages or (_fewest(graph, balance, params, cut_bytes, cap, pins) if np.isfinite(cap) else 1)
        if pin_stages > stages:
            raise PlanError(f"the model pins nodes to pipeline_stage {pin_stages - 1}, but only {stages} stages "
                            f"were asked for; use --stages {pin_stages}")
        if stages > n:
            raise PlanError(f"the model has {n} nodes to place (Constants aside); it cannot make {stages} stages: "
                            f"use --stages {n} or fewer")
        bounds = choose_bounds(balance, params, cut_bytes, stages, max_memory=cap, pins=pins)
        if bounds is None and layout is not None and not np.isfinite(cap):
            raise PlanError(f"no {stages}-stage split keeps each tensor-parallel layer inside one stage (a cut may "
                            f"not fall between a split layer's halves); use fewer stages or --tensor-parallel 1")
        if bounds is None:
            why = f"--max-stage-memory {human_bytes(cap)}" if np.isfinite(cap) else "the pipeline_stage annotations"
            raise PlanError(f"no {stages}-stage split satisfies {why}; raise the cap, add stages, or fix the "
                            "annotations")
    if layout is not None:
        _check_tp_cuts(graph, layout, bounds)
    pieces = _stage_graphs(graph, analysis.specs, bounds)
    flops = [c.flops for c in costs]
    return _write(analysis, pieces, bounds, flops, out, copy_weights, "profile" if node_times else "analytic", cap,
                  Path(source or analysis.path), layout, hash_weights)


def _choose_degree(analysis, balance, params, cut_bytes, cap, pins, stages) -> int:
    """The tensor-parallel degree that fits ``cap`` with the fewest workers (stages x degree), smaller first."""
    best = None
    for degree in (1, 2, 4, 8):
        if degree == 1:
            p, c = params, cut_bytes
        else:
            layout = tp.shard_graph(analysis.graph, analysis.specs, degree)
            if not layout.splits:
                continue
            p, c = layout.node_param_bytes(analysis.graph), _forbid_rank_local_cuts(cut_bytes, analysis.graph, layout)
        if stages is not None:
            fits = choose_bounds(balance, p, c, stages, max_memory=cap, pins=pins) is not None
            count = stages if fits else 0
        else:
            count = fewest_stages(balance, p, c, cap, pins=pins)
        if count and (best is None or count * degree < best[0]):
            best = (count * degree, degree)
    return best[1] if best else 1


def _rank_local_spans(graph: Graph, layout: tp.Layout):
    """(name, made at, last read at) of each sharded value read as each rank's slice: no cut may fall inside,
    since packets between stages carry whole values only."""
    for i, rw in enumerate(layout.rewrites):
        for name in rw.local_reads:
            yield name, graph.producer.get(name, -1), i


def _forbid_rank_local_cuts(cut_bytes: np.ndarray, graph: Graph, layout: tp.Layout) -> np.ndarray:
    cut = np.array(cut_bytes, dtype=float)
    for _, made, last in _rank_local_spans(graph, layout):
        cut[made + 1:last + 1] = np.inf
    return cut


def _check_tp_cuts(graph: Graph, layout: tp.Layout, bounds: list[int]) -> None:
    for name, made, last in _rank_local_spans(graph, layout):
        for b in bounds[1:-1]:
            if made < b <= last:
                raise PlanError(f"a cut before node {graph.nodes[b].name!r} falls inside a tensor-parallel layer "
                                f"({name!r} is sharded across ranks there); cut elsewhere")


def _fewest(graph, balance, params, cut_bytes, cap, pins) -> int:
    stages = fewest_stages(balance, params, cut_bytes, cap, pins=pins)
    if not stages:
        i = int(np.argmax(params))
        raise PlanError(f"no split meets --max-stage-memory {human_bytes(cap)}: node {graph.nodes[i].name!r} alone "
                        f"holds {human_bytes(params[i])} of weights; raise the cap or use tensor parallelism")
    return stages


def _ordered_by_pins(graph: Graph, pins: list[int]) -> Graph:
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


def _intervals(graph: Graph):
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


def _cut_bytes(graph: Graph, specs, dims) -> np.ndarray:
    made, last = _intervals(graph)
    names = list(made)
    sizes = []
    for name in names:
        spec = specs.get(name)
        sizes.append(np.inf if spec is not None and spec.dtype == "non-tensor" else
                     costmod.tensor_bytes(spec, dims))
    return cut_bytes_per_position(len(graph.nodes), [(made[x], last[x]) for x in names], sizes)


def _manual_bounds(graph: Graph, cuts: Sequence[str], stages: int | None) -> list[int]:
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


def _stage_graphs(graph: Graph, specs, bounds) -> list[StageGraph]:
    made, last = _intervals(graph)
    order = {name: i for i, name in enumerate(made)}
    out_set = set(graph.outputs)
    num = len(bounds) - 1

    def received(k):  # what arrives at stage k: R_0 = graph inputs, R_num = graph outputs
        if k == num:
            return list(graph.outputs)
        if k == 0:
            return list(graph.inputs)
        p = bounds[k]
        return sorted((x for x in made if made[x] < p and (last[x] >= p or x in out_set)), key=order.get)

    pieces = []
    for k in range(num):
        nodes = graph.nodes[bounds[k]:bounds[k + 1]]
        produced = {o for node in nodes for o in node.output if o}
        reads = dict.fromkeys(r for rs in graph.reads[bounds[k]:bounds[k + 1]] for r in rs)
        constants = [graph.constants[r] for r in reads if r in graph.constants]
        inits = [graph.initializers[r] for r in reads if r in graph.initializers]
        arriving, leaving = received(k), received(k + 1)
        need = [r for r in reads if r not in produced and r not in graph.initializers and r not in graph.constants]
        missing = [r for r in need if r not in arriving]
        if missing:
            raise PlanError(f"internal: stage {k} reads {missing} that do not reach it")
        outputs = [x for x in leaving if x in produced]
        carry = [x for x in leaving if x not in produced]
        pieces.append(StageGraph(k, nodes, constants, inits, [_spec(specs, x) for x in need],
                                 [_spec(specs, x) for x in outputs], carry))
    return pieces


def _spec(specs, name) -> TensorSpec:
    spec = specs.get(name)
    if spec is None:
        raise PlanError(f"tensor {name!r} crosses a stage boundary but its element type is unknown (shape inference "
                        "cannot type it); choose other cuts with --cut, or plan through `onnxshard plan`, which asks "
                        "ONNX Runtime")
    if spec.dtype == "non-tensor":
        raise PlanError(f"tensor {name!r} is not a plain tensor (sequence, map or a type Arrow cannot carry) and "
                        "cannot cross a stage boundary; choose cuts with --cut that avoid it")
    return spec


def _write(analysis, pieces, bounds, flops, out, copy_weights, cost_source, cap, model_path, layout=None,
           hash_weights=False) -> Plan:
    graph, specs, dims = analysis.graph, analysis.specs, analysis.dims
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # the usual permissions (umask), not mkdtemp's 0700
    except OSError as e:
        raise PlanError(f"--out {out}: cannot create a folder in {out.parent} ({e.strerror or e})") from None
    try:
        models = [build_model(graph.model, piece, len(pieces)) for piece in pieces]
        mode = "none"
        if any(is_external(t) for m in models for t in iter_tensors(m.graph)):
            mode = "copy" if copy_weights else "link" if links_possible(graph.folder, tmp) else "external"
            if mode == "external" and layout is not None:
                mode = "copy"  # rank slices are written into the plan, so the plan must hold every weight
        writer = WeightWriter(graph.folder, tmp, mode)
        stages = []
        for piece, model, lo, hi in zip(pieces, models, bounds, bounds[1:]):
            sends = sum(costmod.tensor_bytes(specs.get(x), dims) for x in [t.name for t in piece.outputs] + piece.carry)
            common = dict(index=piece.index, inputs=tuple(piece.inputs), outputs=tuple(piece.outputs),
                          carry=tuple(piece.carry), nodes=hi - lo, flops=float(sum(flops[lo:hi])), sends_bytes=sends)
            stage = None
            if layout is not None:
                stage = _write_ranks(graph, specs, layout, piece, lo, hi, writer, tmp, len(pieces), common)
            if stage is None:
                writer.rewrite(f"stage{piece.index}", model.graph)
                file = f"stage{piece.index}.onnx"
                onnx.save(model, str(tmp / file))
                param_bytes = sum(tensor_nbytes(t) for t in piece.initializers)
                param_bytes += sum(tensor_nbytes(t) for c in piece.constants for t in node_tensors(c))
                notes = () if layout is None else (f"no layer of this stage splits over {layout.degree} ranks; "
                                                   "it runs as one worker",)
                stage = Stage(file=file, param_bytes=param_bytes, notes=notes, **common)
            if stage.param_bytes > cap:
                raise PlanError(f"stage {piece.index} holds {human_bytes(stage.param_bytes)} of weights per worker "
                                f"(shared weights count in each stage), over --max-stage-memory {human_bytes(cap)}; "
                                "add stages or tensor-parallel ranks")
            stages.append(stage)
        weights = Weights(mode=mode, dir=str(graph.folder.resolve()) if mode == "external" else "weights",
                          files=writer.files)
        plan = Plan(model=str(model_path.resolve()), inputs=tuple(_spec(specs, x) for x in graph.inputs),
                    outputs=tuple(_spec(specs, x) for x in graph.outputs), stages=tuple(stages), weights=weights,
                    cost_source=cost_source, batch_coupled=batch_coupled(graph, specs))
        plan.save(tmp, hash_weights=hash_weights)
        replace_with(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Plan.load(out)


def _write_ranks(graph: Graph, specs, layout: tp.Layout, piece: StageGraph, lo: int, hi: int, writer: WeightWriter,
                 tmp: Path, num_stages: int, common: dict) -> Stage | None:
    """Write a tensor-parallel stage: per step, one ONNX file per rank that runs it. ``None`` when nothing in
    the stage is split (it is then an ordinary one-worker stage)."""
    k, degree = piece.index, layout.degree
    held = set(graph.initializers) | set(graph.constants) | set(layout.weights) | set(layout.consts) | \
        set(layout.rank_consts)
    steps = tp.split_steps(layout, lo, hi, [t.name for t in piece.inputs] + list(piece.carry),
                           [t.name for t in piece.outputs] + list(piece.carry), held,
                           typed=lambda name: layout.value_spec(name, specs) is not None)
    if len(steps) == 1:
        return None
    rank_bytes = [0] * degree
    counted: list[set[str]] = [set() for _ in range(degree)]
    written = []
    for step in steps:
        files = []
        reads = {r for n in step.nodes for r in tp.node_reads(n)}
        for rank in range(step.ranks if step.nodes else 0):
            originals = [graph.initializers[r] for r in reads if r in graph.initializers]
            sg = StageGraph(k, step.nodes, [graph.constants[r] for r in reads if r in graph.constants], originals,
                            [_step_spec(specs, layout, x) for x in step.inputs],
                            [_step_spec(specs, layout, x) for x in step.outputs], [])
            model = build_model(graph.model, sg, num_stages)
            key = f"stage{k}.rank{rank}"
            writer.rewrite(key, model.graph)
            extra = [writer.slice(key, layout.weights[r], _source(graph, layout.weights[r].source), rank, degree)
                     for r in sorted(reads) if r in layout.weights]
            extra += [layout.consts[r] for r in sorted(reads) if r in layout.consts]
            extra += [onnx.numpy_helper.from_array(layout.rank_consts[r].values[rank], r)
                      for r in sorted(reads) if r in layout.rank_consts]
            model.graph.initializer.extend(extra)
            model.metadata_props.add(key="onnxshard.rank", value=f"{rank}/{degree}")
            model.metadata_props.add(key="onnxshard.step", value=f"{step.index}/{len(steps)}")
            model.configuration.add(name=tp.TP_CONFIG, num_devices=degree, device=[f"rank{r}" for r in range(degree)])
            file = f"stage{k}.rank{rank}.step{step.index}.onnx"
            onnx.save(model, str(tmp / file))
            files.append(file)
            for r in reads:
                if r not in counted[rank] and (r in graph.initializers or r in graph.constants or r in layout.weights):
                    counted[rank].add(r)
                    rank_bytes[rank] += tp.rank_bytes(graph, layout, r)
        written.append(Step(ranks=step.ranks, files=tuple(files),
                            inputs=tuple(_step_spec(specs, layout, x) for x in step.inputs),
                            outputs=tuple(_step_spec(specs, layout, x) for x in step.outputs),
                            carry=tuple(step.carry), reduces=tuple(step.reduces)))
    lo_names = {n.name for n in graph.nodes[lo:hi]}
    notes = [n for n in layout.notes if any(f"node {name!r}" in n for name in lo_names)]
    return Stage(file="", param_bytes=max(rank_bytes), tensor_parallel=degree, steps=tuple(written),
                 rank_param_bytes=tuple(rank_bytes), notes=tuple(notes), **common)


def _source(graph: Graph, name: str) -> onnx.TensorProto:
    if name in graph.initializers:
        return graph.initializers[name]
    return next(a.t for a in graph.constants[name].attribute if a.type == onnx.AttributeProto.TENSOR)


def _step_spec(specs, layout: tp.Layout, name: str) -> TensorSpec:
    """The spec of a value inside a tensor-parallel stage (a rank's slice has 1/T of its sharded axis)."""
    return layout.value_spec(name, specs) or _spec(specs, name)
