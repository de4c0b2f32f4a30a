"""Decoders with a KV cache: find each layer's past/present pair, and the prelude a later stage recomputes.

A decoder exported with its cache (optimum / transformers, the ONNX Runtime GenAI model builder) reads
``past_key_values.{i}.key/.value`` and writes ``present.{i}.key/.value``. When onnxshard generates, each stage keeps
its own layers' cache, so only the hidden state and the small inputs (ids, mask, positions) cross a cut. What every
layer reads besides (the 4-D attention mask, RoPE cos/sin) grows with the context or costs little to make, so a
stage that reads it makes it again from the small inputs instead of receiving it.
"""

from __future__ import annotations

import re

from onnxshard.errors import ModelError
from onnxshard.kv_pairs import KvPair
from onnxshard.partitioner.graph import Graph
from onnxshard.partitioner.model import node_tensors, subgraphs, tensor_nbytes

PAST = re.compile(r"^(?:past_key_values|past)[._](\d+)[._](key|value)$")
PRESENT = re.compile(r"^(?:present|present_key_values)[._](\d+)[._](key|value)$")
# A recomputed prelude stays cheap: no products of weights, and little weight data (RoPE tables, causal masks).
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "Attention",
                       "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN", "Einsum"})
PRELUDE_WEIGHT_BYTES = 4 << 20
PRELUDE_NODES = 256


def find_pairs(inputs: list[str], outputs: list[str], explicit: dict[str, str] | None = None) -> tuple[KvPair, ...]:
    """The cache pairs of a model with these graph inputs and outputs: ``explicit`` (past name -> present name)
    when given, else matched by name. Empty for a model without a cache; a model whose names match only in part
    is refused, naming what has no partner."""
    if explicit:
        unknown = [n for n in explicit if n not in inputs] + [n for n in explicit.values() if n not in outputs]
        if unknown:
            raise ModelError(f"the KV-cache map names {unknown}, which are not inputs (past) or outputs (present) "
                             "of the model")
        return tuple(KvPair(i, "cache", past, present) for i, (past, present) in enumerate(explicit.items()))
    pasts = {(int(m[1]), m[2]): name for name in inputs if (m := PAST.match(name))}
    presents = {(int(m[1]), m[2]): name for name in outputs if (m := PRESENT.match(name))}
    lonely = [pasts[k] for k in pasts if k not in presents] + [presents[k] for k in presents if k not in pasts]
    if lonely:
        raise ModelError(f"the decoder's cache names do not pair up: {sorted(lonely)} have no past/present partner "
                         "(expected past_key_values.{i}.key/.value in, present.{i}.key/.value out); pass the pairs "
                         "explicitly (kv_pairs={past: present})")
    return tuple(KvPair(layer, kind, pasts[(layer, kind)], presents[(layer, kind)]) for layer, kind in sorted(pasts))


WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "FusedMatMul"})
ATTENTION_NODES = 512  # a layer's attention past its cache's concat: a bound on the walk below


def uncuttable(graph: Graph, pairs: tuple[KvPair, ...]) -> list[tuple[int, int, str]]:
    """Where no stage may end: ``(first, last, present)``, cuts ``first..last`` (a cut at ``p`` ends a stage
    before node ``p``) fall between the layer's projection that makes the new keys (or values) of its ``present``
    and where its attention is done with them (the first product with a weight, the output projection). Cut after
    the present is made, it, or what the attention makes of it, would cross: every step, and growing with the
    context, where the stage's own cache should have served. Cut between the projection and the present, the
    projected heads and their rotary parts would cross instead of the one hidden state."""
    consumers: dict[str, list[int]] = {}
    for i, reads in enumerate(graph.reads):
        for r in reads:
            consumers.setdefault(r, []).append(i)
    spans = []
    for pair in pairs:
        if pair.present not in graph.producer:
            continue
        made = graph.producer[pair.present]
        last, seen, stack = made, set(), [pair.present]
        while stack and len(seen) < ATTENTION_NODES:
            for i in consumers.get(stack.pop(), ()):
                if i in seen:
                    continue
                seen.add(i)
                last = max(last, i)
                node = graph.nodes[i]
                if node.op_type in WEIGHTED_OPS and any(r in graph.initializers for r in graph.reads[i]):
                    continue  # the attention's output projection: past it, only the hidden state goes on
                stack.extend(o for o in node.output if o)
        if last > made:
            spans.append((_projection(graph, made, pair.past) + 1, last, pair.present))
    return spans


def _projection(graph: Graph, made: int, past: str) -> int:
    """The position of the last product with a weight that the node at ``made`` (which makes a present from
    ``past``) reads through weightless ops: the layer's key or value projection; ``made`` when there is none."""
    found, seen, stack = -1, set(), [x for x in graph.reads[made] if x != past]
    while stack and len(seen) < ATTENTION_NODES:
        i = graph.producer.get(stack.pop())
        if i is None or i in seen:
            continue  # a graph input, a weight, or visited
        seen.add(i)
        if graph.nodes[i].op_type in WEIGHTED_OPS and any(r in graph.initializers for r in graph.reads[i]):
            found = max(found, i)
            continue
        stack.extend(graph.reads[i])
    return made if found < 0 else found


def with_prelude(graph: Graph, spans: list[list[int]], pairs: tuple[KvPair, ...]) -> list[list[int]]:
    """Each stage's node positions, with the prelude nodes that make what it would otherwise receive added to
    it, where that is cheap (see :data:`HEAVY_OPS`) and needs no cache input."""
    pasts = {pair.past for pair in pairs}
    held = set(graph.initializers) | set(graph.constants)
    memo: dict[str, frozenset[int] | None] = {}

    def closure(name: str) -> frozenset[int] | None:
        if name in memo:
            return memo[name]
        memo[name] = None  # a cycle guard; graphs are acyclic, but be safe
        at, stack, weight = set(), [name], 0
        while stack:
            x = stack.pop()
            if x in pasts:
                return None
            if x in graph.inputs or x in held or x not in graph.producer:
                continue
            i = graph.producer[x]
            if i in at:
                continue
            node = graph.nodes[i]
            if node.op_type in HEAVY_OPS or any(True for _ in subgraphs(node)):
                return None
            at.add(i)
            for r in graph.reads[i]:
                if r in graph.initializers:
                    weight += tensor_nbytes(graph.initializers[r])
                elif r in graph.constants:
                    weight += sum(tensor_nbytes(t) for t in node_tensors(graph.constants[r]))
                else:
                    stack.append(r)
            if weight > PRELUDE_WEIGHT_BYTES or len(at) > PRELUDE_NODES:
                return None
        memo[name] = frozenset(at)
        return memo[name]

    out = [list(spans[0])]
    for span in spans[1:]:
        produced = {o for i in span for o in graph.nodes[i].output if o}
        arriving = {r for i in span for r in graph.reads[i] if r not in produced and r not in held}
        extra: set[int] = set()
        for name in arriving:
            if name not in graph.inputs and (nodes := closure(name)) is not None:
                extra |= nodes
        out.append(sorted(extra | set(span)))
    return out
