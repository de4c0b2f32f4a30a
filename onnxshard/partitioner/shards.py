"""Writing stage shard files: standalone ONNX models whose weights reference the model's weight files (hard
links, no bytes copied), a streamed per-stage copy, or the model folder itself."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from onnxshard import dtypes
from onnxshard.partitioner.graph import STAGE_CONFIG
from onnxshard.partitioner.model import external_ref, is_external, iter_nodes, iter_tensors
from onnxshard.plan import TensorSpec

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

    def rewrite(self, stage: int, graph: onnx.GraphProto) -> None:
        tensors = [t for t in iter_tensors(graph) if is_external(t)]
        if not tensors:
            return
        if self.mode == "copy":
            self._copy(stage, tensors)
            return
        for t in tensors:
            loc = external_ref(t).location
            if self.mode == "link":
                self._link(loc)
                _set_external(t, location=f"{WEIGHTS_DIR}/{loc}")
            self.files.setdefault(loc if self.mode == "external" else f"{WEIGHTS_DIR}/{loc}",
                                  os.stat(self.folder / loc).st_size)

    def _link(self, loc: str) -> None:
        target = self.out / WEIGHTS_DIR / loc
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.folder / loc, target)

    def _copy(self, stage: int, tensors: list[TensorProto]) -> None:
        name = f"{WEIGHTS_DIR}/stage{stage}.bin"
        path = self.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        placed: dict[tuple[str, int, int], int] = {}
        with open(path, "wb") as dst:
            for t in tensors:
                ref = external_ref(t)
                key = (ref.location, ref.offset, ref.length)
                if key not in placed:
                    pos = -(-dst.tell() // ALIGN) * ALIGN
                    dst.seek(pos)
                    _stream(self.folder / ref.location, ref.offset, ref.length, dst)
                    placed[key] = pos
                _set_external(t, location=name, offset=placed[key], length=ref.length)
            size = dst.tell()
        self.files[name] = size


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
    g.input.extend(_value_info(t) for t in stage.inputs)
    g.output.extend(_value_info(t) for t in stage.outputs)
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


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    shape = None if spec.shape is None else list(spec.shape)
    return onnx.helper.make_tensor_value_info(spec.name, dtypes.to_elem_type(spec.dtype), shape)


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
