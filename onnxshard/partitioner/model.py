"""Load an ONNX model without its weight bytes and check that every external-data reference is sound."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper

from onnxshard.errors import ModelError

# Ops whose domains onnxshard accepts without a schema in the `onnx` package (ONNX Runtime implements them).
KNOWN_RUNTIME_DOMAINS = frozenset({"com.microsoft", "com.microsoft.nchwc", "ai.onnx.contrib", "com.ms.internal.nhwc"})


@dataclass(frozen=True)
class ExternalRef:
    """Where one initializer's bytes live: ``location`` relative to the model folder, a byte range in it."""

    location: str
    offset: int
    length: int


def load_lazy(path: str | os.PathLike, *, allow_domains: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Parse ``path`` with ``load_external_data=False`` and check it; weight bytes stay on disk."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
                         "check the file is complete (not truncated) and re-export it if needed") from e
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(f"{path} holds no ONNX graph with nodes (is it an ONNX file, and complete?)")
    check_domains(model, path, allow_domains)
    check_external_data(model, path.parent)
    return model


def check_domains(model: onnx.ModelProto, path: Path, allow_domains: frozenset[str]) -> None:
    imported = {o.domain or "" for o in model.opset_import}
    functions = {(f.domain, f.name) for f in model.functions}
    version = {o.domain or "": o.version for o in model.opset_import}
    for node in iter_nodes(model.graph.node):
        domain = node.domain or ""
        if domain == "ai.onnx":
            domain = ""
        if (node.domain, node.op_type) in functions:
            continue
        if domain not in imported:
            raise ModelError(f"node {node.name or node.op_type!r} in {path.name} uses domain {domain!r}, which the "
                             f"model does not import (opset_import has {sorted(imported)}); fix the export")
        if domain in ("", "ai.onnx.ml", "ai.onnx.preview.training"):
            if not onnx.defs.has(node.op_type, domain):
                raise ModelError(f"node {node.name or node.op_type!r} in {path.name} uses op {node.op_type!r}, "
                                 f"which is not in ONNX domain {domain or 'ai.onnx'!r} (opset {version[domain]})")
        elif domain not in KNOWN_RUNTIME_DOMAINS and domain not in allow_domains:
            raise ModelError(f"node {node.name or node.op_type!r} in {path.name} uses custom domain {domain!r} "
                             f"({node.op_type}); if your ONNX Runtime has a custom-op library for it, pass "
                             f"--allow-domain {domain}")


def subgraphs(node: onnx.NodeProto):
    """The If/Loop/Scan bodies held in ``node``'s attributes."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_nodes(nodes):
    """Every node of ``nodes`` (a graph's or a function's) and of their subgraphs, depth first."""
    for node in nodes:
        yield node
        for sub in subgraphs(node):
            yield from iter_nodes(sub.node)


def iter_tensors(graph: onnx.GraphProto):
    """Every TensorProto in ``graph``: initializers and Constant values, its subgraphs' included."""
    yield from graph.initializer
    for node in graph.node:
        yield from node_tensors(node)


def node_tensors(node: onnx.NodeProto):
    """The TensorProtos ``node`` holds: tensor attributes (Constant values) and its subgraphs' tensors."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield attr.t
    for sub in subgraphs(node):
        yield from iter_tensors(sub)


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_ref(tensor: TensorProto) -> ExternalRef:
    """Where ``tensor``'s bytes live, as ONNX's own ``ExternalDataInfo`` reads its ``external_data`` entries."""
    info = external_data_helper.ExternalDataInfo(tensor)
    if not info.location:
        raise ModelError(f"initializer {tensor.name!r} is marked external but names no location")
    try:
        length = int(info.length) if info.length is not None else tensor_nbytes(tensor)
        return ExternalRef(info.location, int(info.offset or 0), length)
    except ValueError:
        raise ModelError(f"initializer {tensor.name!r} has a malformed external-data offset or length") from None


def tensor_nbytes(tensor: TensorProto) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    if tensor.data_type == TensorProto.STRING:
        return 0
    return n * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse locations that leave ``folder``, missing files and files shorter than the ranges they must hold."""
    sizes: dict[str, int] = {}
    real_folder = os.path.realpath(folder)
    for tensor in iter_tensors(model.graph):
        if not is_external(tensor):
            continue
        ref = external_ref(tensor)
        loc = ref.location
        target = os.path.realpath(folder / loc)
        if os.path.isabs(loc) or os.path.commonpath([real_folder, target]) != real_folder:
            raise ModelError(f"initializer {tensor.name!r} points to external data {loc!r}, outside the model "
                             f"folder {folder}; move the weight file next to the model")
        if loc not in sizes:
            try:
                sizes[loc] = os.stat(target).st_size
            except FileNotFoundError:
                raise ModelError(f"external-data file {folder / loc} (for initializer {tensor.name!r}) is missing; "
                                 "copy it next to the model") from None
        if ref.offset + ref.length > sizes[loc]:
            raise ModelError(f"external-data file {folder / loc} is {sizes[loc]} bytes but initializer "
                             f"{tensor.name!r} needs bytes {ref.offset}..{ref.offset + ref.length}; the file is "
                             "truncated or belongs to another export")


def load_inline(tensor: TensorProto, folder: Path) -> None:
    """Read an external tensor's bytes into it, in place, with ONNX's own reader (one range read; for small
    tensors only: shapes, axes, split sizes)."""
    try:
        external_data_helper.load_external_data_for_tensor(tensor, str(folder))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the external data of initializer {tensor.name!r}: {e}") from None
