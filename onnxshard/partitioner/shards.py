"""Writing stage shard files: standalone ONNX models whose weights reference the model's weight files (hard
links, no bytes copied), a streamed per-stage copy, or the model folder itself."""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxshard import dtypes
from onnxshard.partitioner.graph import STAGE_CONFIG
from onnxshard.partitioner.model import external_ref, is_external, iter_nodes, iter_tensors
from onnxshard.plans import NON_TENSOR, TensorSpec

WEIGHTS_DIR = "weights"
ALIGN = 4096  # ONNX Runtime memory-maps external data only at page-aligned offsets
CHUNK = 8 << 20


@dataclass
class StageGraph:
    """The pieces of one stage before it is written."""

    index: int
    nodes: list[onnx.NodeProto]
    constants: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    carry: list[str]


@dataclass
class WeightWriter:
    """Rewrites external-data references as shards are written, in one of the plan's weight modes."""

    folder: Path  # the model's folder
    out: Path  # the plan folder being written
    mode: str  # "link", "copy" or "external"
    files: dict[str, int] = field(default_factory=dict)
    _placed: dict[str, dict] = field(default_factory=dict)  # per copy file: source range -> offset

    def rewrite(self, key: str, graph: onnx.GraphProto) -> None:
        """Point ``graph``'s external tensors (the model's own, not slices) at the plan's weights; in copy mode,
        copy them into ``weights/{key}.bin``."""
        tensors = [t for t in iter_tensors(graph) if is_external(t)]
        if self.mode == "copy":
            for t in tensors:
                ref = external_ref(t)
                name, pos = self._append(key, (ref.location, ref.offset, ref.length),
                                         lambda dst, ref=ref: _stream(self.folder / ref.location, ref.offset,
                                                                      ref.length, dst))
                _set_external(t, location=name, offset=pos, length=ref.length)
            return
        for t in tensors:
            self._refer(t, external_ref(t).location)

    def slice(self, key: str, ws, source: TensorProto, rank: int, degree: int) -> TensorProto:
        """Rank ``rank``'s slice ``ws`` of ``source``: a new byte range of the same file when the slice is one
        contiguous range (leading-axis splits), else its elements streamed into ``weights/{key}.bin``."""
        dims = list(source.dims)
        chunks = ws.chunks(rank, degree)
        new_dims = dims.copy()
        new_dims[ws.axis] = sum(n for _, n in chunks)
        if not is_external(source):
            arr = numpy_helper.to_array(source)
            part = np.concatenate([np.take(arr, np.arange(s, s + n), axis=ws.axis) for s, n in chunks], ws.axis)
            return numpy_helper.from_array(part, ws.name)
        ref = external_ref(source)
        inner = math.prod(dims[ws.axis + 1:]) * _itemsize(source)
        t = TensorProto(name=ws.name, dims=new_dims, data_type=source.data_type,
                        data_location=TensorProto.EXTERNAL)
        if ws.contiguous(dims) and self.mode != "copy":
            (s, n), = chunks
            _set_external(t, location=ref.location, offset=ref.offset + s * inner, length=n * inner)
            self._refer(t, ref.location)
            return t
        outer, dim = math.prod(dims[:ws.axis]), dims[ws.axis]

        def write(dst):  # at most CHUNK bytes of the source in memory at once
            row = dim * inner
            if row > CHUNK:  # big rows: stream each chunk's byte range
                for o in range(outer):
                    for s, n in chunks:
                        _stream(self.folder / ref.location, ref.offset + o * row + s * inner, n * inner, dst)
                return
            step = CHUNK // max(1, row)
            with open(self.folder / ref.location, "rb") as f:
                for o in range(0, outer, step):
                    k = min(step, outer - o)
                    f.seek(ref.offset + o * row)
                    rows = np.frombuffer(f.read(k * row), np.uint8).reshape(k, dim, inner)
                    dst.write(np.concatenate([rows[:, s:s + n] for s, n in chunks], axis=1).tobytes())

        length = outer * new_dims[ws.axis] * inner
        name, pos = self._append(key, (ws.name, rank), write)
        _set_external(t, location=name, offset=pos, length=length)
        return t

    def _refer(self, t: TensorProto, loc: str) -> None:
        if self.mode == "link":
            self._link(loc)
            _set_external(t, location=f"{WEIGHTS_DIR}/{loc}")
        self.files.setdefault(loc if self.mode == "external" else f"{WEIGHTS_DIR}/{loc}",
                              os.stat(self.folder / loc).st_size)

    def _append(self, key: str, what, write) -> tuple[str, int]:
        """Write (once per ``what``) into ``weights/{key}.bin`` at a page-aligned offset; return (file, offset)."""
        name = f"{WEIGHTS_DIR}/{key}.bin"
        placed = self._placed.setdefault(name, {})
        if what not in placed:
            path = self.out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as dst:
                end = dst.tell()
                pos = -(-end // ALIGN) * ALIGN
                dst.write(b"\0" * (pos - end))
                write(dst)
                self.files[name] = dst.tell()
            placed[what] = pos
        return name, placed[what]

    def _link(self, loc: str) -> None:
        target = self.out / WEIGHTS_DIR / loc
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.folder / loc, target)

def links_possible(folder: Path, out: Path) -> bool:
    """Whether hard links from the model folder into the plan folder work (same filesystem, allowed)."""
    probe_src = next((p for p in folder.iterdir() if p.is_file()), None)
    if probe_src is None:
        return False
    probe = out / ".link-probe"
    try:
        os.link(probe_src, probe)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
    probe.unlink()
    return True


def build_model(source: onnx.ModelProto, stage: StageGraph, num_stages: int) -> onnx.ModelProto:
    g = onnx.GraphProto(name=f"{source.graph.name or 'graph'}_stage{stage.index}")
    for node in stage.constants + stage.nodes:
        copy = g.node.add()
        copy.CopyFrom(node)
        kept = [c for c in copy.device_configurations if not c.HasField("pipeline_stage")]
        del copy.device_configurations[:]
        copy.device_configurations.extend(kept)
        copy.device_configurations.add(configuration_id=STAGE_CONFIG, pipeline_stage=stage.index)
    g.initializer.extend(stage.initializers)
    edges = {v.name: v for v in [*source.graph.input, *source.graph.output]}  # the model's own, as declared
    g.input.extend(_value_info(t, edges) for t in stage.inputs)
    g.output.extend(_value_info(t, edges) for t in stage.outputs)
    produced = {o for n in stage.nodes for o in n.output}
    g.value_info.extend(v for v in source.graph.value_info if v.name in produced)
    m = onnx.ModelProto(
        ir_version=max(source.ir_version, 11), producer_name="onnxshard", producer_version=source.producer_version,
        domain=source.domain, model_version=source.model_version, doc_string=source.doc_string, graph=g,
    )
    m.opset_import.extend(source.opset_import)
    m.metadata_props.extend(source.metadata_props)
    m.metadata_props.add(key="onnxshard.stage", value=f"{stage.index}/{num_stages}")
    m.functions.extend(used_functions(source, g))
    m.configuration.add(name=STAGE_CONFIG, num_devices=num_stages, device=[f"stage{i}" for i in range(num_stages)])
    return m


def used_functions(model: onnx.ModelProto, graph: onnx.GraphProto) -> list[onnx.FunctionProto]:
    """The model-local functions ``graph`` calls, directly or through other functions and subgraphs."""
    by_key = {(f.domain, f.name, f.overload): f for f in model.functions}
    wanted: dict[tuple, onnx.FunctionProto] = {}
    todo = list(iter_nodes(graph.node))
    while todo:
        node = todo.pop()
        key = (node.domain, node.op_type, node.overload)
        if key in by_key and key not in wanted:
            wanted[key] = by_key[key]
            todo.extend(iter_nodes(by_key[key].node))
    return [f for key, f in by_key.items() if key in wanted]


def _value_info(spec: TensorSpec, edges: dict[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto:
    """A stage's input or output: a tensor as its spec says; a sequence or optional (only ever one of the model's
    own inputs and outputs) as the model declares it."""
    if spec.dtype == NON_TENSOR:
        return edges[spec.name]
    shape = None if spec.shape is None else list(spec.shape)
    return onnx.helper.make_tensor_value_info(spec.name, dtypes.to_elem_type(spec.dtype), shape)


def _itemsize(t: TensorProto) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _set_external(tensor: TensorProto, *, location: str, offset: int | None = None, length: int | None = None):
    info = {e.key: e.value for e in tensor.external_data}
    info["location"] = location
    if offset is not None:
        info["offset"] = str(offset)
    if length is not None:
        info["length"] = str(length)
    del tensor.external_data[:]
    for k, v in info.items():
        tensor.external_data.add(key=k, value=v)


def _stream(src: Path, offset: int, length: int, dst) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                raise OSError(f"{src} ended {left} bytes early")
            dst.write(block)
            left -= len(block)
