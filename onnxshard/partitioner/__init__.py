"""Split an ONNX model into pipeline stages. Knows nothing of Ray or ONNX Runtime.

``partition`` is pure planning plus file writing: model metadata in, a saved :class:`~onnxshard.plans.Plan` out.
Whatever needs ONNX Runtime (measured costs, typing tensors shape inference cannot) comes in as plain data or a
callback from :mod:`onnxshard.api`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from onnxshard.partitioner import boundaries
from onnxshard.partitioner.analysis import Analysis, TypeOracle, analyse_model, input_specs
from onnxshard.partitioner.decision import Decision, decide
from onnxshard.partitioner.out import check_out
from onnxshard.partitioner.writing import write
from onnxshard.plans import Plan

__all__ = ["Analysis", "Decision", "TypeOracle", "analyse_model", "check_out", "decide", "input_specs", "most_stages",
           "partition"]


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
    kv_pairs: dict[str, str] | None = None,
    workers: int | None = None,
) -> Plan:
    """Choose stage bounds and write the plan folder ``out`` (atomically: nothing half-written on error).

    ``node_times`` (node name -> measured seconds) replaces the analytic FLOP estimate as the balance cost.
    ``source`` is the model the plan reproduces, when ``analysis`` is of a rewritten copy of it.
    ``tensor_parallel`` splits every stage's layers over that many ranks; ``None`` with ``max_stage_memory``
    picks the degree (1, 2, 4 or 8) that fits in the fewest workers. ``hash_weights``: record a digest of every
    weight byte (see :meth:`Plan.save`). ``kv_pairs`` (past -> present) names a decoder's cache pairs where
    their names do not follow ``past_key_values.{i}.key`` / ``present.{i}.key``. ``workers``: the plan's shape
    (stages x replicas, see :func:`cuts.choose_shape`) for that many workers, when ``stages`` is not given; the
    plan records the replicas, which a Pipeline runs by default.
    """
    out = Path(os.path.abspath(out))
    check_out(out, [analysis.path, Path(source or analysis.path)])
    decision = decide(analysis, stages=stages, cuts=cuts, max_stage_memory=max_stage_memory, node_times=node_times,
                      tensor_parallel=tensor_parallel, kv_pairs=kv_pairs, workers=workers)
    return write(decision, out, copy_weights=copy_weights, model_path=Path(source or analysis.path),
                 hash_weights=hash_weights)


def most_stages(analysis: Analysis) -> int:
    """The most stages the analysed model can be cut into: one per node (Constants aside), less the places that a
    value no stage boundary can carry (a sequence, an optional, a float8 or int4 tensor) would have to cross."""
    graph = analysis.graph
    cut_bytes = boundaries.cut_bytes_of(graph, analysis.specs, analysis.dims)
    return boundaries.most_stages(graph, analysis.specs, cut_bytes)[0]
