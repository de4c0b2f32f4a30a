"""Writing the decided plan: the stage graphs, one ONNX file per stage (per rank and step for a tensor-parallel
stage), the weights (linked, copied or sliced), and plan.json, into a temporary folder that then replaces
``out`` (nothing half-written on error)."""

from __future__ import annotations

import secrets
import shutil
from dataclasses import replace
from pathlib import Path

import onnx

from onnxshard.errors import PlanError
from onnxshard.partitioner import cost as costmod
from onnxshard.partitioner import kv
from onnxshard.partitioner import tensor_parallel as tp
from onnxshard.partitioner.boundaries import intervals
from onnxshard.partitioner.coupling import batch_coupled
from onnxshard.partitioner.decision import Decision
from onnxshard.partitioner.flops import unpriced
from onnxshard.partitioner.graph import Graph
from onnxshard.partitioner.model import is_external, iter_tensors, node_tensors, tensor_nbytes
from onnxshard.partitioner.out import replace_with
from onnxshard.partitioner.shards import StageGraph, WeightWriter, build_model, links_possible
from onnxshard.plans import NON_TENSOR, Plan, Stage, Step, TensorSpec, Weights
from onnxshard.units import human_bytes


def stage_graphs(graph: Graph, specs, bounds, kv_pairs=()) -> list[StageGraph]:
    """The stages' graphs: stage k runs nodes ``bounds[k]:bounds[k+1]``; with a decoder's ``kv_pairs``, a later
    stage also runs the prelude nodes that make what it would otherwise receive (see :mod:`.kv`)."""
    made, _ = intervals(graph)
    order = {name: i for i, name in enumerate(made)}
    num = len(bounds) - 1
    held = set(graph.initializers) | set(graph.constants)
    spans = [list(range(bounds[k], bounds[k + 1])) for k in range(num)]
    if kv_pairs:
        spans = kv.with_prelude(graph, spans, kv_pairs)
    produced = [{o for i in span for o in graph.nodes[i].output if o} for span in spans]
    reads = [dict.fromkeys(r for i in span for r in graph.reads[i]) for span in spans]
    need = [[r for r in reads[k] if r not in produced[k] and r not in held] for k in range(num)]
    arriving = [set() for _ in range(num)] + [set(graph.outputs)]  # what each stage receives; the last: outputs
    for k in reversed(range(num)):
        arriving[k] = set(need[k]) | (arriving[k + 1] - produced[k])
    missing = [r for r in need[0] if r not in graph.inputs]
    if missing:
        raise PlanError(f"internal: stage 0 reads {missing} that do not reach it")
    pieces = []
    for k, span in enumerate(spans):
        leaving = list(graph.outputs) if k == num - 1 else sorted(arriving[k + 1], key=lambda x: order.get(x, -2))
        outputs = [x for x in leaving if x in produced[k]]
        carry = [x for x in leaving if x not in produced[k]]
        pieces.append(StageGraph(k, [graph.nodes[i] for i in span],
                                 [graph.constants[r] for r in reads[k] if r in graph.constants],
                                 [graph.initializers[r] for r in reads[k] if r in graph.initializers],
                                 [_spec(specs, x, edge=k == 0 and x in graph.inputs) for x in need[k]],
                                 [_spec(specs, x, edge=k == num - 1 and x in graph.outputs) for x in outputs], carry))
    return pieces


def _spec(specs, name, edge: bool = False) -> TensorSpec:
    """``name``'s spec where it crosses a boundary; a non-tensor value (a sequence, an optional) only at the model's
    own inputs and outputs (``edge``), where it never leaves the stage's process."""
    spec = specs.get(name)
    if spec is None:
        raise PlanError(f"tensor {name!r} crosses a stage boundary but its element type is unknown (shape inference "
                        "cannot type it); choose other cuts with --cut, or plan through `onnxshard plan`, which asks "
                        "ONNX Runtime")
    if spec.dtype == NON_TENSOR and not edge:
        raise PlanError(f"tensor {name!r} is not a plain tensor (sequence, map or a type Arrow cannot carry) and "
                        "cannot cross a stage boundary; choose cuts with --cut that avoid it")
    return spec


def write(decision: Decision, out: Path, *, copy_weights: bool, model_path: Path, hash_weights: bool) -> Plan:
    """Write the plan ``decision`` describes into the folder ``out``, a decoder's cache pairs recorded in it."""
    analysis, bounds, layout, cap = decision.analysis, list(decision.bounds), decision.layout, decision.cap
    flops, work, cost_source = decision.flops, decision.work, decision.cost_source
    graph, specs, dims = analysis.graph, analysis.specs, analysis.dims
    pairs = decision.kv_pairs
    pieces = stage_graphs(graph, specs, bounds, pairs if layout is None else ())
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
                          carry=tuple(piece.carry), nodes=len(piece.nodes), flops=float(sum(flops[lo:hi])),
                          work=float(sum(work[lo:hi])), boundary_work=decision.boundary_work[piece.index],
                          sends_bytes=sends)
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
            if cost_source == "analytic" and (guessed := unpriced(graph.nodes[lo:hi])):
                stage = replace(stage, notes=stage.notes + (_guessed_note(guessed),))
            stages.append(stage)
        weights = Weights(mode=mode, dir=str(graph.folder.resolve()) if mode == "external" else "weights",
                          files=writer.files)
        plan = Plan(model=str(model_path.resolve()), inputs=tuple(_spec(specs, x, edge=True) for x in graph.inputs),
                    outputs=tuple(_spec(specs, x, edge=True) for x in graph.outputs), stages=tuple(stages), weights=weights,
                    cost_source=cost_source, batch_coupled=batch_coupled(graph, specs), kv_cache=pairs,
                    replicas=decision.replicas,
                    cost_dims=costmod.input_dims(graph, specs, dims))
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
                    rank_bytes[rank] += tp.rank_bytes(graph, layout, r, rank)
        written.append(Step(ranks=step.ranks, files=tuple(files),
                            inputs=tuple(_step_spec(specs, layout, x) for x in step.inputs),
                            outputs=tuple(_step_spec(specs, layout, x) for x in step.outputs),
                            carry=tuple(step.carry), reduces=tuple(step.reduces)))
    notes = [note for starts, note in layout.notes if any(lo <= i < hi for i in starts)]
    return Stage(file="", param_bytes=max(rank_bytes), tensor_parallel=degree, steps=tuple(written),
                 rank_param_bytes=tuple(rank_bytes), notes=tuple(notes), **common)


def _guessed_note(ops: dict[str, int]) -> str:
    listed = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in sorted(ops.items()))
    return (f"cost model: no FLOP formula for {listed}; counted as one operation per output element, so this cut "
            "may be unbalanced: plan with --profile to measure them")


def _source(graph: Graph, name: str) -> onnx.TensorProto:
    if name in graph.initializers:
        return graph.initializers[name]
    return next(a.t for a in graph.constants[name].attribute if a.type == onnx.AttributeProto.TENSOR)


def _step_spec(specs, layout: tp.Layout, name: str) -> TensorSpec:
    """The spec of a value inside a tensor-parallel stage (a rank's slice has 1/T of its sharded axis)."""
    return layout.value_spec(name, specs) or _spec(specs, name)
