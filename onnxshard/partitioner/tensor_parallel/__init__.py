"""Tensor (Megatron-style) sharding: the same layers on T ranks, each holding a slice of the weights.

Every tensor gets a *state*: ``R`` (replicated: every rank holds all of it), ``S(axis)`` (sharded: rank ``r``
holds the ``r``-th of T chunks along ``axis``, as equal as whole ``unit``s allow; for a fused projection the axis
is a row of ``blocks``, each cut in T) or ``P`` (partial: the value is the sum of the ranks' addends). One pass
over the nodes in topological order decides the states (``propagation.py``):

- a MatMul/Gemm or Conv with a replicated input and a weight initializer is split by output columns/channels
  (``S``); one whose input is sharded along the contracted axis takes the matching weight rows (``P``); a large
  embedding Gather takes a range of vocabulary rows and masks the ids outside it (``P``, ``vocab.py``);
- ops that work along other axes (elementwise, reshapes of head counts, transposes, attention MatMuls, softmax
  over another axis, fused-QKV Split, GQA Expand) keep a sharded tensor sharded, with their shape constants
  rewritten to the per-rank sizes; a replicated operand meeting a sharded one is sliced locally (``rules.py``: a
  registry from op type to rule);
- a consumer that needs the whole tensor reads it *full*: the ranks sum a ``P`` (all-reduce) or concatenate an
  ``S`` (all-gather) first. Row-split biases are added after the sum, once.

A size T does not divide is cut unevenly: the first ranks take one unit more (a vocabulary row, a channel, or a
head once a reshape shows the head width, when the split is made again in whole heads). A split too small for T
parts is rolled back (its layers stay replicated), and the reason is kept in ``notes`` for ``onnxshard
inspect``. The original name of a tensor always means its full value; a rank's local
value is ``name@shard`` (S) or ``name@partial`` (P). The types are in ``layout.py``.

The stage writer then cuts each stage's rewritten nodes into *steps* at the reduces (``steps.py``): step ``j``
runs on every rank, then the ranks exchange what step ``j + 1`` needs whole.
"""

from onnxshard.partitioner.graph import node_reads
from onnxshard.partitioner.tensor_parallel.layout import (
    REPLICATED,
    TP_CONFIG,
    Layout,
    RankConst,
    Rewrite,
    State,
    WeightSlice,
    rank_bytes,
)
from onnxshard.partitioner.tensor_parallel.propagation import shard_graph
from onnxshard.partitioner.tensor_parallel.rules import RULES
from onnxshard.partitioner.tensor_parallel.steps import StepGraph, split_steps
from onnxshard.partitioner.tensor_parallel.vocab import VOCAB_MIN_BYTES

__all__ = ["REPLICATED", "RULES", "TP_CONFIG", "VOCAB_MIN_BYTES", "Layout", "RankConst", "Rewrite", "State",
           "StepGraph", "WeightSlice", "node_reads", "rank_bytes", "shard_graph", "split_steps"]
