"""The cost model: element types and shapes from ONNX shape inference, FLOPs (``flops.py``), parameter and
activation bytes, and the work the planner balances (FLOPs plus the activation bytes each node moves; a stage also
pays for the bytes crossing its boundaries, see ``SEND_BYTE_FLOPS``).

Costs are per sample: symbolic dims count as 1 unless the caller gives them a size (``dims={"seq": 128}``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from onnxshard import dtypes
from onnxshard.partitioner.flops import node_flops
from onnxshard.partitioner.graph import Graph
from onnxshard.partitioner.model import is_external, load_inline, tensor_nbytes
from onnxshard.plans import NON_TENSOR, TensorSpec, spec_bytes

log = logging.getLogger(__name__)

SMALL_INT_BYTES = 1 << 16  # external int64 initializers up to this size are read to help shape inference


# What moving one byte of activations (read or written) costs, in FLOPs. Counted by FLOPs alone, elementwise ops,
# Softmax, Transpose and a decoder's cache concatenation cost nothing, while they take 25-30% of a transformer's
# time in ORT's per-node profile (GPT-2-style, batch 4 x 128: MatMuls ~9x the rate, FLOPs to bytes, of those ops).
# Swept from 0 to 24 against that profile on the models of benchmarks/cost_vs_profile.py, 12-16 fit best (every
# cut within 4 pp; FLOPs alone left GPT-2's cuts 10-12 pp off).
BYTE_FLOPS = 12.0
# What a byte crossing a stage boundary costs the workers, in FLOPs, beyond what a whole model pays: the stage that
# makes it copies it out of ORT into a new array (page faults included) and writes it to its socket; the next stage
# reads it off its socket. Measured on the developer VM (2 cores): a fresh copy 0.37 ns/byte, a Unix-socket write
# 0.22 ns/byte and read 0.25 ns/byte, against ORT's 94 GFLOP/s for a one-thread MatMul. The graph's outputs pay the
# sending side in the stage that makes them (a GPT-2-sized model's logits: 26 MB a sample of 128 tokens).
SEND_BYTE_FLOPS = 55.0
RECEIVE_BYTE_FLOPS = 23.0
# Ops that make a view of their input (or a small tensor from its shape): no bytes moved.
VIEWS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant",
                   "ConstantOfShape", "Dropout"})


@dataclass(frozen=True)
class NodeCost:
    flops: float
    param_bytes: int  # bytes of initializers this node is the first to read, and of the Constants it reads
    out_bytes: int
    moved_bytes: int = 0  # activation bytes the node reads and writes (0 for ops that only make a view)

    @property
    def work(self) -> float:
        """What the planner balances: FLOPs plus :data:`BYTE_FLOPS` per activation byte moved."""
        return self.flops + BYTE_FLOPS * self.moved_bytes


def in_balance_units(byte_flops: tuple[float, float], balance, work) -> tuple[float, float]:
    """``byte_flops`` (FLOP-equivalents a byte sent, received) in the units of ``balance``: the nodes' ``work``,
    or their profiled seconds (converted at the rate the profile measured for that work)."""
    total = float(sum(work))
    scale = float(sum(balance)) / total if total > 0 else 0.0
    return byte_flops[0] * scale, byte_flops[1] * scale


def infer_specs(graph: Graph, known: dict[str, TensorSpec] | None = None) -> dict[str, TensorSpec]:
    """Type and shape of every tensor ONNX shape inference can tell, starting from ``known`` (tensors typed by
    other means, e.g. outputs of contrib ops). Names it cannot type are absent, and non-tensor values (sequences,
    maps, optionals) get dtype ``"non-tensor"``."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    for spec in (known or {}).values():
        if spec.dtype != NON_TENSOR:
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(
                spec.name, dtypes.to_elem_type(spec.dtype), None if spec.shape is None else list(spec.shape)))
    for tensor in model.graph.initializer:
        # Reshape/Slice/Expand shapes are small int64 tensors; shape inference needs their values.
        if is_external(tensor) and tensor.data_type == TensorProto.INT64 and tensor_nbytes(tensor) <= SMALL_INT_BYTES:
            load_inline(tensor, graph.folder)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as e:
        # keep what the model declares; untyped boundaries are typed later by the caller's oracle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("ONNX shape inference failed on this model (%s): costs and cut sizes use only the shapes the "
                    "model declares, and tensors it does not type count as 0 bytes", first[:300])
    specs: dict[str, TensorSpec] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        spec = spec_from_value_info(vi)
        if spec is not None:
            specs[vi.name] = spec
    for name, spec in (known or {}).items():
        if name not in specs or specs[name].shape is None:
            specs[name] = spec
    for t in model.graph.initializer:
        specs[t.name] = TensorSpec(t.name, _dtype(t.data_type), tuple(t.dims))
    for name, node in graph.constants.items():
        t = constant_tensor(node)
        if t is not None:
            specs[name] = TensorSpec(name, _dtype(t.data_type), tuple(t.dims))
    return specs


# Ops whose inputs broadcast numpy-style into their output (MatMul: over the dims before the last two).
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Equal",
                           "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift",
                           "PRelu", "MatMul"})


def infer_dim_sizes(graph: Graph, specs: dict[str, TensorSpec], dims: dict[str, int]) -> dict[str, int]:
    """``dims`` plus sizes for the anonymous dims shape inference invents where it cannot tell two symbols apart.

    Broadcasting ``(batch, seq, d) + (p, d)`` (a position embedding sliced to ``seq``) gives ``(batch, unk__2, d)``,
    and every layer after it then works on ``unk__2`` positions, which would count as 1 while the LM head, typed from
    the graph outputs, counts ``seq``. Where a broadcasting node's output dim has no size and an input's dim at that
    place has one other than 1, the output dim has it too (broadcasting allows nothing else); the same anonymous
    symbol then has that size everywhere. Only the costs use this: the specs (and so the plan's checks of inputs)
    keep their symbols."""
    sizes = dict(dims)
    if not dims:
        return sizes

    def size(d):
        return d if isinstance(d, int) else sizes.get(d) if isinstance(d, str) else None

    for node in graph.nodes:
        if node.op_type not in _BROADCASTING or not node.output or node.output[0] not in specs:
            continue
        out = specs[node.output[0]].shape
        ins = [specs[i].shape for i in node.input if i and i in specs and specs[i].shape is not None]
        if out is None or not ins:
            continue
        skip = 2 if node.op_type == "MatMul" else 0  # MatMul's last two dims do not broadcast
        for j in range(1, len(out) - skip + 1):
            d = out[len(out) - skip - j]
            if not isinstance(d, str) or d in sizes:
                continue
            # an input's size other than 1 there is the output's (broadcasting allows only 1 or that size)
            known = {size(shape[len(shape) - skip - j]) for shape in ins if len(shape) - skip >= j} - {1, None}
            if len(known) == 1:
                sizes[d] = known.pop()
    return sizes


def spec_from_value_info(vi: onnx.ValueInfoProto) -> TensorSpec | None:
    kind = vi.type.WhichOneof("value")
    if kind is None:
        return None
    if kind != "tensor_type":
        return TensorSpec(vi.name, NON_TENSOR, None)
    tt = vi.type.tensor_type
    if tt.elem_type == TensorProto.UNDEFINED:
        return None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else _dim_name(d.dim_param) for d in tt.shape.dim)
    return TensorSpec(vi.name, _dtype(tt.elem_type), shape)


def _dim_name(param: str) -> str | None:
    """A symbolic dim's name; ``None`` (unknown, shared with nothing) for none, and for ``?``, which some exporters
    (PaddlePaddle's) write for every unknown dim: taken as a name, all of a model's unknown dims would have to
    agree."""
    return None if param in ("", "?") else param


def _dtype(elem_type: int) -> str:
    try:
        return dtypes.from_elem_type(elem_type)
    except ValueError:
        return NON_TENSOR  # float8, int4, ...: cannot cross a stage boundary as Arrow


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def input_dims(graph: Graph, specs: dict[str, TensorSpec], dims: dict[str, int]) -> dict[str, int | None]:
    """Each symbolic dim of the graph's inputs and the size costs use for it (``None``: not given, counted 1)."""
    return {d: dims.get(d) for x in graph.inputs if specs.get(x) is not None for d in specs[x].shape or ()
            if isinstance(d, str)}


def concrete(spec: TensorSpec | None, dims: dict[str, int]) -> tuple[int, ...] | None:
    if spec is None or spec.shape is None:
        return None
    return tuple(d if isinstance(d, int) else dims.get(d, 1) if isinstance(d, str) else 1 for d in spec.shape)


def tensor_bytes(spec: TensorSpec | None, dims: dict[str, int]) -> int:
    """Bytes of a tensor per sample; 0 when its shape or type is unknown (it then costs nothing to cut)."""
    if spec is None or spec.shape is None or spec.dtype == NON_TENSOR:
        return 0
    return spec_bytes(spec, dims)


def node_costs(graph: Graph, specs: dict[str, TensorSpec], dims: dict[str, int]) -> list[NodeCost]:
    seen: set[str] = set()
    costs = []
    for node, reads in zip(graph.nodes, graph.reads):
        params = 0
        for name in reads:
            if name in graph.constants:
                t = constant_tensor(graph.constants[name])
                params += tensor_nbytes(t) if t is not None else 0
            elif name in graph.initializers and name not in seen:
                seen.add(name)
                params += tensor_nbytes(graph.initializers[name])
        out_bytes = sum(tensor_bytes(specs.get(o), dims) for o in node.output if o)
        moved = 0
        if node.op_type not in VIEWS:
            moved = out_bytes + sum(tensor_bytes(specs.get(x), dims) for x in node.input
                                    if x and x not in graph.initializers and x not in graph.constants)
        costs.append(NodeCost(node_flops(node, specs, dims), params, out_bytes, moved))
    return costs
