"""The KServe v2 / Open Inference Protocol for one model: its metadata, an infer request (HTTP JSON with the
binary tensor data extension, or gRPC ``ModelInferRequest``) checked into numpy feeds, and the response built
from the pipeline's outputs. No web framework and no Ray here: the routes (``ingress.py``) only move bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from onnxshard.plans import TensorSpec
from onnxshard.serve.tensors import (
    ProtocolError,
    check_header,
    datatype_of,
    from_bytes,
    from_data,
    shape_of,
    tensor_metadata,
    to_bytes,
    to_data,
)

VERSION = "1"  # every model is served as version 1
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
# gRPC typed contents field per datatype (raw_input_contents is the usual path; FP16 and BF16 have no typed field)
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@dataclass(frozen=True)
class ModelSpec:
    """What a served model takes and gives."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str = "onnxruntime_onnx"

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [VERSION], "platform": self.platform,
                "inputs": [tensor_metadata(t) for t in self.inputs],
                "outputs": [tensor_metadata(t) for t in self.outputs]}

    def input(self, name) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ProtocolError(f"unknown input {name!r}; model {self.name!r} takes {[t.name for t in self.inputs]}")

    def output(self, name) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise ProtocolError(f"unknown output {name!r}; model {self.name!r} gives {[t.name for t in self.outputs]}")


@dataclass
class InferRequest:
    """A checked infer request: its id, the feeds, and the outputs to return (name, as binary data?)."""

    id: str | None
    feeds: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] = field(default_factory=list)


def check_version(version: str | None) -> None:
    if version is not None and version != VERSION:
        raise ProtocolError(f"unknown model version {version!r}; version {VERSION} is served", 404)


def parse_http(spec: ModelSpec, body: bytes, header_length: str | None) -> InferRequest:
    """An HTTP infer body: JSON, or with ``Inference-Header-Content-Length``, JSON then the binary tensors."""
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} must be a whole number of "
                                f"bytes within the body ({len(body)} bytes)")
        head, binary = body[:size], memoryview(body)[size:]
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request body must be a JSON object with 'inputs'")
    _check_params(request.get("parameters"), "the request")
    tensors = _list(request.get("inputs"), "inputs")
    if not tensors:
        raise ProtocolError(f"'inputs' is empty; model {spec.name!r} takes {[t.name for t in spec.inputs]}")
    feeds: dict[str, np.ndarray] = {}
    at = 0
    for tensor in tensors:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError("each of 'inputs' must be an object with a string 'name'")
        name = tensor["name"]
        shape = _input_header(spec, tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), feeds)
        params = _check_params(tensor.get("parameters"), f"input {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise ProtocolError(f"input {name!r} has both 'data' and binary_data_size; give one")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the binary data "
                                    f"({len(binary) - at} bytes left after the JSON header)")
            feeds[name] = from_bytes(spec.input(name), shape, binary[at:at + size])
            at += size
        elif "data" in tensor:
            feeds[name] = from_data(spec.input(name), shape, tensor["data"])
        else:
            raise ProtocolError(f"input {name!r} has neither 'data' nor binary_data_size")
    if at != len(binary):
        raise ProtocolError(f"the binary tensor data is {len(binary)} bytes, but the inputs' binary_data_size add "
                            f"to {at}")
    _check_complete(spec, feeds)
    default_binary = bool(_check_params(request.get("parameters"), "the request").get("binary_data_output", False))
    wanted = request.get("outputs")
    outputs = []
    if wanted is None:
        outputs = [(t.name, default_binary) for t in spec.outputs]
    else:
        for out in _list(wanted, "outputs"):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise ProtocolError("each of 'outputs' must be an object with a string 'name'")
            params = _check_params(out.get("parameters"), f"output {out['name']!r}")
            outputs.append((spec.output(out["name"]).name, bool(params.get("binary_data", default_binary))))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    return InferRequest(request_id, feeds, outputs)


def http_response(spec: ModelSpec, request: InferRequest, results: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header."""
    outputs, blobs = [], []
    for name, binary in request.outputs:
        value = results[name]
        entry = {"name": name, "datatype": datatype_of(spec.output(name)), "shape": list(value.shape)}
        if binary:
            blob = to_bytes(value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = to_data(value)
        outputs.append(entry)
    body = {"model_name": spec.name, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def parse_grpc(spec: ModelSpec, request) -> InferRequest:
    """A gRPC ``ModelInferRequest``: tensors in ``raw_input_contents`` (what tritonclient sends) or in each
    input's typed ``contents``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    feeds: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        shape = _input_header(spec, tensor.name, tensor.datatype, list(tensor.shape), feeds)
        if raw:
            feeds[tensor.name] = from_bytes(spec.input(tensor.name), shape, raw[i])
            continue
        field_name = _CONTENTS.get(tensor.datatype)
        if field_name is None:
            raise ProtocolError(f"input {tensor.name!r}: {tensor.datatype} travels only in raw_input_contents")
        values = list(getattr(tensor.contents, field_name))
        if tensor.datatype == "BYTES":
            try:
                values = [v.decode() for v in values]
            except UnicodeDecodeError:
                raise ProtocolError(f"input {tensor.name!r}: BYTES elements must be UTF-8 text") from None
        feeds[tensor.name] = from_data(spec.input(tensor.name), shape, values)
    _check_complete(spec, feeds)
    outputs = [(spec.output(out.name).name, True) for out in request.outputs] or \
        [(t.name, True) for t in spec.outputs]
    return InferRequest(request.id or None, feeds, outputs)


def grpc_response(spec: ModelSpec, request: InferRequest, results: dict[str, np.ndarray], response) -> None:
    """Fill a ``ModelInferResponse``: outputs in ``raw_output_contents``, as tritonclient reads them."""
    response.model_name = spec.name
    response.model_version = VERSION
    if request.id:
        response.id = request.id
    for name, _ in request.outputs:
        value = results[name]
        out = response.outputs.add()
        out.name = name
        out.datatype = datatype_of(spec.output(name))
        out.shape.extend(value.shape)
        response.raw_output_contents.append(to_bytes(value))


def _input_header(spec: ModelSpec, name, datatype, shape, seen: dict) -> tuple[int, ...]:
    model_input = spec.input(name)
    if name in seen:
        raise ProtocolError(f"input {name!r} is given twice")
    return check_header(model_input, datatype, shape)


def _check_complete(spec: ModelSpec, feeds: dict) -> None:
    missing = [t.name for t in spec.inputs if t.name not in feeds]
    if missing:
        raise ProtocolError(f"missing input(s) {missing}; model {spec.name!r} takes {[t.name for t in spec.inputs]}")


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        raise ProtocolError(f"'{what}' must be a list (got {type(value).__name__})")
    return value


def _check_params(params, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"'parameters' of {where} must be an object")
    if "classification" in params:
        raise ProtocolError(f"{where}: the classification extension is not supported")
    return params


__all__ = ["ModelSpec", "InferRequest", "ProtocolError", "parse_http", "http_response", "parse_grpc",
           "grpc_response", "shape_of"]
